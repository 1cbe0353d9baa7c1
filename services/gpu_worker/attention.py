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
    * ``decode_rows: [B * KVH * L]`` rows of the cache viewed as ``[slots * KVH, D]`` that hold
      each decoding sequence's context (current token included), head-major per sequence, so
      one ``index_select`` gathers a contiguous ``[B, KVH, L, D]``; padding reads slot 0.
    * ``decode_mask: [B, 1, 1, L]`` marks the real (unpadded) context positions.
    """

    slot_mapping: torch.Tensor
    prefill: list[tuple[int, int]]
    decode_idx: torch.Tensor | None = None
    decode_rows: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                    cache_v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend.

    ``q: [T, H, D]``, ``k``/``v``: ``[T, KVH, D]``, ``cache_k``/``cache_v``: ``[slots, KVH, D]``.
    Returns ``[T, H * D]``. Prefill sequences attend causally to themselves (GQA through
    SDPA's ``enable_gqa``); decode tokens attend to their cached context (see :func:`decode_attention`).
    """
    cache_k.index_copy_(0, meta.slot_mapping, k)
    cache_v.index_copy_(0, meta.slot_mapping, v)
    decoding = meta.decode_idx is not None and meta.decode_idx.numel() > 0
    if decoding and not meta.prefill and meta.decode_idx.numel() == q.shape[0]:
        return decode_attention(q, cache_k, cache_v, meta).flatten(1)  # a decode-only step
    out = torch.empty_like(q)
    for start, end in meta.prefill:
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
    if decoding:
        out[meta.decode_idx] = decode_attention(q[meta.decode_idx], cache_k, cache_v, meta)
    return out.flatten(1)


def decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                     meta: AttentionMetadata) -> torch.Tensor:
    """One query token per decoding sequence: ``q: [B, H, D]`` -> ``[B, H, D]``.

    The context is gathered head-major into contiguous ``[B, KVH, L, D]``; the ``G = H / KVH``
    query heads sharing a KV head become SDPA's query length (``[B, KVH, G, D]``), so GQA
    needs no repeated K/V and SDPA reads the gathered K/V once per KV head.
    """
    b, kvh, d = q.shape[0], cache_k.shape[1], cache_k.shape[2]
    kd = cache_k.view(-1, d).index_select(0, meta.decode_rows).view(b, kvh, -1, d)
    vd = cache_v.view(-1, d).index_select(0, meta.decode_rows).view(b, kvh, -1, d)
    od = F.scaled_dot_product_attention(q.view(b, kvh, -1, d), kd, vd, attn_mask=meta.decode_mask)
    return od.view(b, -1, d)
