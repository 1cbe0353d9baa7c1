"""Paged attention over a mixed batch of prefill and decode tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Where each token of a step lives in the KV cache and what it attends to.

    * ``slot_mapping: [T]`` cache slot written with each token's K/V.
    * ``prefill``: ``(start, end)`` token ranges of sequences prefilled from position 0.
    * ``decode_idx: [B]`` batch indices of decode tokens (one per decoding sequence).
    * ``decode_slots: [B, L]`` cache slots of each decoding sequence's context, current
      token included, padded with slot 0; ``decode_mask: [B, 1, 1, L]`` marks real slots.
    """

    slot_mapping: torch.Tensor
    prefill: list[tuple[int, int]]
    decode_idx: torch.Tensor | None = None
    decode_slots: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                    cache_v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend.

    ``q: [T, H, D]``, ``k``/``v``: ``[T, KVH, D]``, ``cache_k``/``cache_v``: ``[slots, KVH, D]``.
    Returns ``[T, H * D]``. Prefill sequences attend causally to themselves; decode tokens
    attend to their cached context. GQA is handled by SDPA's ``enable_gqa``.
    """
    cache_k.index_copy_(0, meta.slot_mapping, k)
    cache_v.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    for start, end in meta.prefill:
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
    if meta.decode_idx is not None and meta.decode_idx.numel():
        qd = q[meta.decode_idx].unsqueeze(2)  # [B, H, 1, D]
        kd = cache_k[meta.decode_slots].permute(0, 2, 1, 3)  # [B, KVH, L, D]
        vd = cache_v[meta.decode_slots].permute(0, 2, 1, 3)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, enable_gqa=True)
        out[meta.decode_idx] = od.squeeze(2)
    return out.flatten(1)
