"""Triton shrink and expand kernels for batched multi-LoRA (the CUDA path of lora_ops).

Same semantics as :mod:`services.gpu_worker.lora_ops`: for each segment ``(start, end, u)``
of the segment table, ``y[start:end] += x[start:end] @ A[u] @ B[u]``. The work is split in
two launches, as Punica and S-LoRA do:

* **shrink**: ``v[t, :] = x[t] @ A[u_t]`` into a ``[T, R]`` float32 buffer (fp32 accumulate);
* **expand**: ``y[t] += v[t] @ B[u_t]``, accumulated in float32 and rounded once into y's dtype.

Both kernels run one program per (segment, block of its tokens, block of columns), so tokens
in no segment are never touched, and ``y`` may be any strided 2-D view (e.g. a column slice of
a fused qkv output). Two modes, chosen by ``pad_rank``:

* padded (``pad_rank = R``, BGMV): every segment computes ``R`` rank columns, zero beyond its
  own rank (masked loads), so the cost is tokens x R;
* per-segment rank (``pad_rank = 0``, MBGMV/SGMV): a segment's shrink programs past its rank
  exit at once, and its expand loop stops at its rank, so the cost is sum of tokens x r_u.

How the kernels reach the weights: a per-adapter **pointer table**, not stacked buffers.
Per call the launcher (1) builds, on the CPU, one int64 table holding the segment rows
``[G, 3]`` and, per adapter, ``(A[u].data_ptr(), B[u].data_ptr(), r_u)`` ``[U, 3]``,
(2) moves it to the device in one copy, (3) allocates ``v`` ``[T, R]`` float32 and
(4) launches shrink then expand. No weight is padded, stacked or copied (weights are
required contiguous, which they are as loaded; a non-contiguous one is made contiguous).
The kernels load ``A[u]``'s address from the table and cast it to a typed pointer.

The grid is sized from the longest segment, read from the CPU segment table, and the table is
a fresh tensor per call; CUDA-graph capture needs both held in static buffers instead.

Weights are in the activations' dtype (``A[u]``: ``[in, r_u]``, ``B[u]``: ``[r_u, out]``,
scaling folded in); ``r_u == 0`` (an empty tensor) means no weights, and such segments are
skipped. Tiles are upcast to float32 before ``tl.dot``: tf32 holds bf16/fp16 values exactly,
so bf16/fp16 models use tf32 tensor cores with no loss and fp32 models use exact ("ieee") products.

With ``TRITON_INTERPRET=1`` set before ``triton`` is first imported in the process (it is read
when ``triton.jit`` decorates a kernel, triton's own library kernels included), the launchers
run on CPU tensors in Triton's interpreter; that is how the unit tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_T = 16
"""Tokens per program (tl.dot needs tiles of at least 16)."""
BLOCK_R = 16
"""Rank columns per shrink program, and rank rows per expand loop step."""
BLOCK_K = 64
"""Input features per shrink loop step."""
BLOCK_N = 64
"""Output columns per expand program."""


@triton.jit
def _segment(segs_ptr, adapters_ptr, g):
    """Row g of the segment table and its adapter's entry: start, end, A address, B address, rank."""
    start = tl.load(segs_ptr + g * 3)
    end = tl.load(segs_ptr + g * 3 + 1)
    u = tl.load(segs_ptr + g * 3 + 2)
    a_addr = tl.load(adapters_ptr + u * 3)
    b_addr = tl.load(adapters_ptr + u * 3 + 1)
    rank = tl.load(adapters_ptr + u * 3 + 2)
    return start, end, a_addr, b_addr, rank


@triton.jit
def _shrink_kernel(x_ptr, v_ptr, segs_ptr, adapters_ptr, fan_in, v_width, stride_xt, stride_xk,
                   PADDED: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``v[t, cols] = x[t] @ A[u][:, cols]`` for one (segment, token block, rank block)."""
    start, end, a_addr, _, rank = _segment(segs_ptr, adapters_ptr, tl.program_id(0))
    row0 = start + tl.program_id(1) * BLOCK_T
    col0 = tl.program_id(2) * BLOCK_R
    width = v_width if PADDED else rank
    if rank == 0 or row0 >= end or col0 >= width:
        return
    a_ptr = a_addr.to(tl.pointer_type(x_ptr.dtype.element_ty))
    rows = row0 + tl.arange(0, BLOCK_T)
    cols = col0 + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, fan_in, BLOCK_K):
        k = k0 + ks
        xs = tl.load(x_ptr + rows[:, None] * stride_xt + k[None, :] * stride_xk,
                     mask=(rows[:, None] < end) & (k[None, :] < fan_in), other=0.0)
        a = tl.load(a_ptr + k[:, None] * rank + cols[None, :],
                    mask=(k[:, None] < fan_in) & (cols[None, :] < rank), other=0.0)
        acc += tl.dot(xs.to(tl.float32), a.to(tl.float32), input_precision=PRECISION)
    tl.store(v_ptr + rows[:, None] * v_width + cols[None, :], acc,
             mask=(rows[:, None] < end) & (cols[None, :] < width))


@triton.jit
def _expand_kernel(v_ptr, y_ptr, segs_ptr, adapters_ptr, fan_out, v_width, stride_yt, stride_yn,
                   PADDED: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """``y[t, cols] += v[t] @ B[u][:, cols]`` for one (segment, token block, output block)."""
    start, end, _, b_addr, rank = _segment(segs_ptr, adapters_ptr, tl.program_id(0))
    row0 = start + tl.program_id(1) * BLOCK_T
    if rank == 0 or row0 >= end:
        return
    b_ptr = b_addr.to(tl.pointer_type(y_ptr.dtype.element_ty))
    depth = v_width if PADDED else rank
    rows = row0 + tl.arange(0, BLOCK_T)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, depth, BLOCK_R):
        r = r0 + rs
        vs = tl.load(v_ptr + rows[:, None] * v_width + r[None, :],
                     mask=(rows[:, None] < end) & (r[None, :] < depth), other=0.0)
        b = tl.load(b_ptr + r[:, None] * fan_out + cols[None, :],
                    mask=(r[:, None] < rank) & (cols[None, :] < fan_out), other=0.0)
        acc += tl.dot(vs, b.to(tl.float32), input_precision=PRECISION)
    out = y_ptr + rows[:, None] * stride_yt + cols[None, :] * stride_yn
    mask = (rows[:, None] < end) & (cols[None, :] < fan_out)
    y = tl.load(out, mask=mask, other=0.0)
    tl.store(out, (y.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _contiguous_weights(y: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The weights as contiguous tensors (a no-op as loaded), once y and they match x's dtype and device.

    The kernels type the loaded weight addresses with x's (A) and y's (B) element type.
    """
    for t in (y, *weights):
        if t.numel() and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"LoRA tensor {t.dtype} on {t.device} does not match activations {x.dtype} on {x.device}")
    return [w.contiguous() for w in weights]


def device_tables(segs: torch.Tensor, A: list[torch.Tensor], B: list[torch.Tensor],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment table ``[G, 3]`` and adapter table ``[U, 3]`` (A address, B address, rank), int64 on ``device``.

    Built on the CPU and moved in one copy; ``A``/``B`` must stay alive until the kernels ran.
    """
    adapters = torch.tensor([(a.data_ptr(), b.data_ptr(), a.shape[1] if a.numel() else 0) for a, b in zip(A, B)],
                            dtype=torch.int64).reshape(-1, 3)
    table = torch.cat([segs.to(torch.int64).reshape(-1), adapters.reshape(-1)]).to(device)
    return table[:segs.numel()].view(-1, 3), table[segs.numel():].view(-1, 3)


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: tf32 is exact on bf16/fp16 values (upcast), so only fp32 models need ieee."""
    return "ieee" if dtype == torch.float32 else "tf32"


def shrink(v: torch.Tensor, x: torch.Tensor, segs: torch.Tensor, adapters: torch.Tensor,
           max_tokens: int, padded: bool) -> None:
    """``v[t, :r] = x[t] @ A[u_t]`` per segment: ``r = R`` if padded (zeros beyond r_u), else ``r_u``.

    ``v``: ``[T, R]`` float32, ``x``: ``[T, in]`` (any strides), ``segs``/``adapters``: from
    :func:`device_tables`; ``max_tokens``: the longest segment (sizes the grid).
    """
    grid = (segs.shape[0], triton.cdiv(max_tokens, BLOCK_T), triton.cdiv(v.shape[1], BLOCK_R))
    _shrink_kernel[grid](x, v, segs, adapters, x.shape[1], v.shape[1], x.stride(0), x.stride(1),
                         PADDED=padded, PRECISION=_precision(x.dtype),
                         BLOCK_T=BLOCK_T, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K)


def expand(y: torch.Tensor, v: torch.Tensor, segs: torch.Tensor, adapters: torch.Tensor,
           max_tokens: int, padded: bool) -> None:
    """``y[t] += v[t, :r] @ B[u_t][:r]`` per segment, accumulated in float32, rounded once into y's dtype.

    ``y``: ``[T, out]`` (any strides), ``v``: ``[T, R]`` float32 from :func:`shrink`.
    """
    grid = (segs.shape[0], triton.cdiv(max_tokens, BLOCK_T), triton.cdiv(y.shape[1], BLOCK_N))
    _expand_kernel[grid](v, y, segs, adapters, y.shape[1], v.shape[1], y.stride(0), y.stride(1),
                         PADDED=padded, PRECISION=_precision(y.dtype),
                         BLOCK_T=BLOCK_T, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N)


def lora_segments_(y: torch.Tensor, x: torch.Tensor, segs: torch.Tensor, A: list[torch.Tensor],
                   B: list[torch.Tensor], pad_rank: int) -> None:
    """``y += lora(x)`` in place, the contract of the native kernel's ``lora_segments_``.

    ``segs``: int64 ``[G, 3]`` on the CPU; ``pad_rank``: the batch's max rank for BGMV,
    0 for per-segment rank (MBGMV).
    """
    A, B = _contiguous_weights(y, x, A), _contiguous_weights(y, x, B)
    width = pad_rank or max((a.shape[1] for a in A if a.numel()), default=0)
    max_tokens = int((segs[:, 1] - segs[:, 0]).max()) if segs.numel() else 0
    if width == 0 or max_tokens <= 0:
        return
    seg_table, adapters = device_tables(segs, A, B, x.device)
    v = torch.empty(x.shape[0], width, dtype=torch.float32, device=x.device)
    shrink(v, x, seg_table, adapters, max_tokens, padded=pad_rank > 0)
    expand(y, v, seg_table, adapters, max_tokens, padded=pad_rank > 0)
