"""Paged attention over a mixed batch of prefill and decode tokens."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from shared.native_ops import paged_attention_kernel


class StepAttention(Protocol):
    """How a step's tokens store their K/V and attend: the model calls :meth:`attend` once per layer."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
               cache_v: torch.Tensor) -> torch.Tensor:
        """Write ``k``/``v: [T, KVH, D]`` into the layer's cache, then attend with ``q: [T, H, D]``;
        returns ``[T, H * D]``."""


@dataclass
class DecodeGroup:
    """Decoding sequences attended together, their contexts padded to the group's longest, ``W`` blocks.

    * ``idx: [B]`` batch indices of their decode tokens (one per sequence).
    * ``tables: [B, W]`` each sequence's block ids (padding 0) and ``lengths: [B]`` its context
      length, current token included: what the native kernel reads.
    * ``kv_heads``, ``block_size``: the cache's, from which the torch path derives ``blocks`` and
      ``mask`` (on first use, once per step: the native kernel never needs them).
    """

    idx: torch.Tensor
    tables: torch.Tensor
    lengths: torch.Tensor
    kv_heads: int
    block_size: int

    @functools.cached_property
    def blocks(self) -> torch.Tensor:
        """``[B * KVH * W]`` rows of the cache viewed as ``[num_blocks * KVH, block_size, D]`` (one block
        of one KV head) that hold each sequence's context, head-major per sequence, so one
        ``index_select`` of whole blocks gathers a contiguous ``[B, KVH, W * block_size, D]``;
        padding blocks read block 0."""
        heads = torch.arange(self.kv_heads, device=self.tables.device).view(1, -1, 1)
        return (self.tables.unsqueeze(1) * self.kv_heads + heads).flatten()  # [B, KVH, W] flattened

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """``[B, 1, 1, W * block_size]``: the real context positions (current token included)."""
        positions = torch.arange(self.tables.shape[1] * self.block_size, device=self.tables.device)
        return (positions.unsqueeze(0) < self.lengths.unsqueeze(1))[:, None, None, :]


@dataclass
class PrefillGroup:
    """The sequences prefilled from position 0 in a step.

    * ``ranges``: each one's ``(start, end)`` token range in the batch;
    * ``starts``, ``lengths: [S]``: the same as tensors, and ``tables: [S, W]`` their block ids
      (padding 0): what the native kernel reads.
    """

    ranges: list[tuple[int, int]]
    starts: torch.Tensor
    lengths: torch.Tensor
    tables: torch.Tensor


@dataclass
class AttentionMetadata:
    """Where each token of a step lives in the KV cache and what it attends to.

    * ``write_rows: [T * KVH]`` rows of the cache viewed as ``[num_blocks * KVH * block_size, D]``
      written with each token's K/V heads (token-major, as ``k.reshape(-1, D)`` orders them).
    * ``prefill``: the sequences prefilled from position 0, if any.
    * ``decode``: the decoding sequences in groups of similar context length (less padding).
    """

    write_rows: torch.Tensor
    prefill: PrefillGroup | None = None
    decode: list[DecodeGroup] = field(default_factory=list)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
               cache_v: torch.Tensor) -> torch.Tensor:
        """The :class:`StepAttention` of an eager step: :func:`paged_attention`."""
        return paged_attention(q, k, v, cache_k, cache_v, self)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
                    cache_v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Write this step's K/V into the cache, then attend.

    ``q: [T, H, D]``, ``k``/``v``: ``[T, KVH, D]``, ``cache_k``/``cache_v``:
    ``[num_blocks, KVH, block_size, D]`` (see :func:`~services.gpu_worker.kv_cache.allocate_cache`).
    Returns ``[T, H * D]``. Prefill sequences attend causally to themselves (see
    :func:`prefill_attention`); decode tokens attend to their cached context (see :func:`decode_attention`).
    """
    write_kv(k, v, cache_k, cache_v, meta.write_rows)
    if not meta.prefill and len(meta.decode) == 1 and meta.decode[0].idx.numel() == q.shape[0]:
        # a decode-only step in one group: its tokens are the whole batch, in order
        return decode_attention(q, cache_k, cache_v, meta.decode[0]).flatten(1)
    out = torch.empty_like(q)
    if meta.prefill:
        prefill_attention(out, q, k, v, cache_k, cache_v, meta.prefill)
    for group in meta.decode:
        out[group.idx] = decode_attention(q[group.idx], cache_k, cache_v, group)
    return out.flatten(1)


def prefill_attention(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cache_k: torch.Tensor, cache_v: torch.Tensor, group: PrefillGroup) -> None:
    """Causal attention of the prefill tokens into their rows of ``out: [T, H, D]`` (``q: [T, H, D]``,
    ``k``/``v: [T, KVH, D]``, their K/V already written to the cache).

    On CPUs where the native kernel prefills (bf16 paired tiles: ``prefills`` in
    ``csrc/paged_attention_cpu.cpp``; its GEMMs on the matrix units with AMX, else on the bf16
    dot-product instruction), it reads K/V from the cache; elsewhere :func:`sdpa_prefill_attention` runs.
    """
    if native_prefill(cache_k, q.shape[1]):
        paged_attention_kernel().paged_prefill_attention_(out, q.contiguous(), cache_k, cache_v, group.tables,
                                                          group.starts, group.lengths)
        return
    sdpa_prefill_attention(out, q, k, v, group.ranges)


def sdpa_prefill_attention(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           ranges: list[tuple[int, int]]) -> None:
    """Prefill attention in plain torch (the reference of the native kernel): each ``(start, end)`` range
    of ``q: [T, H, D]`` attends causally to its own ``k``/``v: [T, KVH, D]`` (GQA through SDPA's
    ``enable_gqa``), into the same rows of ``out: [T, H, D]``."""
    for start, end in ranges:
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out[start:end] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)[0].transpose(0, 1)


def write_kv(k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
             rows: torch.Tensor) -> None:
    """Store this step's ``k``/``v: [T, KVH, D]`` at cache ``rows: [T * KVH]`` (see AttentionMetadata.write_rows).

    On the CPU the native kernel writes the rows in one call, in the tile layout its decode
    attention reads (see :func:`pair_k_tiles`); ``index_copy_`` is the reference.
    """
    if native_decode(cache_k):
        k, v = (t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous() for t in (k, v))
        paged_attention_kernel().write_kv_(cache_k, cache_v, k, v, rows)
        return
    write_kv_rows(k, v, cache_k, cache_v, rows)


def write_kv_rows(k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                  rows: torch.Tensor) -> None:
    """:func:`write_kv` in torch ops, K stored plainly: row ``rows[i]`` of the caches viewed as
    ``[num_blocks * KVH * block_size, D]`` gets row i of ``k``/``v`` viewed as ``[T * KVH, D]``."""
    d = k.shape[-1]
    cache_k.view(-1, d).index_copy_(0, rows, k.reshape(-1, d))
    cache_v.view(-1, d).index_copy_(0, rows, v.reshape(-1, d))


def pair_k_tiles(cache_k: torch.Tensor) -> torch.Tensor:
    """``cache_k: [N, KVH, bs, D]`` with each tile's ``[bs, D]`` values reordered as bf16 pairs along D,
    ``[D / 2, bs, 2]`` (same shape and dtype): the K layout of the native kernel on CPUs with the bf16
    dot-product instruction (``paired_k_tiles`` in ``csrc/paged_attention_cpu.cpp`` says when)."""
    n, kvh, bs, d = cache_k.shape
    return cache_k.view(n, kvh, bs, d // 2, 2).transpose(2, 3).contiguous().view(n, kvh, bs, d)


def native_decode(cache: torch.Tensor) -> bool:
    """Whether decode attention over ``cache`` runs the native CPU kernel (one pass over the cache,
    no padding, so the runner puts every decoding sequence in one group)."""
    return (cache.device.type == "cpu" and cache.dtype in (torch.float32, torch.bfloat16)
            and paged_attention_kernel() is not None)


def native_prefill(cache: torch.Tensor, heads: int) -> bool:
    """Whether prefill attention over ``cache`` with ``heads`` query heads runs the native CPU kernel."""
    return native_decode(cache) and paged_attention_kernel().prefills(cache, heads)


def decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                     group: DecodeGroup) -> torch.Tensor:
    """One query token per decoding sequence: ``q: [B, H, D]`` -> ``[B, H, D]``.

    On the CPU the native kernel (``csrc/paged_attention_cpu.cpp``) reads the block tiles in place;
    elsewhere :func:`gathered_decode_attention` runs.
    """
    if native_decode(cache_k):
        return paged_attention_kernel().paged_decode_attention(q.contiguous(), cache_k, cache_v,
                                                               group.tables, group.lengths)
    return gathered_decode_attention(q, cache_k, cache_v, group)


def gathered_decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                              group: DecodeGroup) -> torch.Tensor:
    """Decode attention in plain torch (the reference of the native kernel): ``q: [B, H, D]`` -> ``[B, H, D]``.

    The context is gathered a whole (block, KV head) at a time into contiguous
    ``[B, KVH, W * block_size, D]``; the ``G = H / KVH`` query heads sharing a KV head become
    SDPA's query length (``[B, KVH, G, D]``), so GQA needs no repeated K/V and SDPA reads the
    gathered K/V once per KV head.
    """
    b, kvh, bs, d = q.shape[0], cache_k.shape[1], cache_k.shape[2], cache_k.shape[3]
    kd = cache_k.view(-1, bs, d).index_select(0, group.blocks).view(b, kvh, -1, d)
    vd = cache_v.view(-1, bs, d).index_select(0, group.blocks).view(b, kvh, -1, d)
    od = F.scaled_dot_product_attention(q.view(b, kvh, -1, d), kd, vd, attn_mask=group.mask)
    return od.view(b, -1, d)
