"""Triton paged decode attention: the CUDA kernel of a captured decode step (see decode_graph.py).

Same result as :func:`~services.gpu_worker.attention.gathered_decode_attention`, the plain-torch
reference: one query token per sequence attends to its first ``lengths[b]`` cached tokens. The
kernel reads the cache's ``[block_size, D]`` tiles in place through the block table, so its
shapes do not follow the longest context: the same launch serves every step of a batch size,
which is what graph capture needs (the gathered path allocates ``[B, KVH, W * block_size, D]``
with ``W`` the step's widest table).

One program per (sequence, KV head) computes the ``G = H / KVH`` query heads that share the KV
head: for each block of the context, scores ``[G, block_size]``, then an online softmax (running
max ``m``, running sum ``l``, rescaled output ``acc``), all in float32. The cache layout is
:func:`~services.gpu_worker.kv_cache.allocate_cache`'s, with K stored plainly (``write_kv_rows``).
Sizes need not be powers of two: ``G``, ``block_size`` and ``D`` are padded to the next power
of two in registers and masked.

Like triton_lora.py, it runs on CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1``
is set before ``triton`` is first imported; that is how the unit tests check it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lengths_ptr, scale,
                   stride_qb, stride_qh, stride_ob, stride_oh, stride_tb, kv_heads, group, block_size, head_dim,
                   BLOCK_G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out[b, heads of h]`` = softmax(q K^T * scale) V over sequence b's context, for KV head h."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    length = tl.load(lengths_ptr + b)
    gs = tl.arange(0, BLOCK_G)
    ss = tl.arange(0, BLOCK_S)
    ds = tl.arange(0, BLOCK_D)
    heads = h * group + gs
    q_mask = (gs[:, None] < group) & (ds[None, :] < head_dim)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + ds[None, :], mask=q_mask, other=0.0)
    q = q.to(tl.float32) * scale  # [G, D]
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for start in range(0, length, block_size):
        block = tl.load(tables_ptr + b * stride_tb + start // block_size)
        valid = (ss < block_size) & (start + ss < length)
        offsets = ((block * kv_heads + h) * block_size + ss[:, None]) * head_dim + ds[None, :]
        kv_mask = valid[:, None] & (ds[None, :] < head_dim)
        k = tl.load(k_ptr + offsets, mask=kv_mask, other=0.0).to(tl.float32)  # [S, D]
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, S]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + offsets, mask=kv_mask, other=0.0).to(tl.float32)  # [S, D]
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l = l * alpha + tl.sum(p, axis=1)
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + ds[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, tables: torch.Tensor,
                           lengths: torch.Tensor) -> torch.Tensor:
    """``q: [B, H, D]`` (last dim contiguous) -> ``[B, H, D]``.

    ``cache_k``/``cache_v``: contiguous ``[num_blocks, KVH, block_size, D]``; ``tables: [B, W]`` block
    ids (only the first ``ceil(lengths[b] / block_size)`` of row b are read); ``lengths: [B]``, each
    at least 1 (the current token, already written).
    """
    b, heads, d = q.shape
    _, kv_heads, block_size, _ = cache_k.shape
    if q.stride(2) != 1 or not (cache_k.is_contiguous() and cache_v.is_contiguous() and tables.stride(1) == 1):
        raise ValueError("paged_decode_attention needs q's last dim, the caches and the table rows contiguous")
    out = torch.empty_like(q)
    group = heads // kv_heads
    _decode_kernel[(b, kv_heads)](q, cache_k, cache_v, out, tables, lengths, 1.0 / math.sqrt(d),
                                  q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
                                  kv_heads, group, block_size, d,
                                  BLOCK_G=triton.next_power_of_2(group), BLOCK_S=triton.next_power_of_2(block_size),
                                  BLOCK_D=triton.next_power_of_2(d))
    return out
