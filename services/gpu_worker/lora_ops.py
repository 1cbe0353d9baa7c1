"""Batched multi-LoRA ops: one projection's LoRA deltas for a whole mixed batch.

Semantics shared by both backends, for a batch whose tokens are laid out so that the
tokens of one adapter form contiguous segments::

    for each segment (start, end, u):
        y[start:end] += x[start:end] @ A[u] @ B[u]

* ``x``: ``[T, in]`` activations, ``y``: ``[T, out]`` output of the base projection
  (updated in place; may be a column slice of a fused output).
* ``A[u]``: ``[in, r_u]``, ``B[u]``: ``[r_u, out]`` with the LoRA scaling folded in.
  ``r_u == 0`` (an empty tensor) means the adapter has no weights on this projection.
* Tokens in no segment (base-model requests) are left untouched.
* On CPU, the residency may keep an adapter in the native kernel's pair layouts instead
  (:func:`kernel_layout`): ``A[u]`` as ``[in / 2, r_u, 2]``, row pair ``(i, i + 1)`` as
  ``r_u`` bf16 pairs, and ``B[u]`` as ``[ceil(out / 64), ceil(r_u / 2), 64, 2]``, for each
  block of 64 output columns its row pairs ``(k, k + 1)`` as 64 bf16 pairs, zero past row
  ``r_u`` and column ``out``. ``A[u].shape[1]`` is the rank in both layouts. A decode step
  then reads both front to back, with no shuffles (docs/engine_performance.md, round 10).
  Only the native CPU kernel reads them.

The two backends differ in cost, not in result:

* ``bgmv`` (Punica): every adapter in the batch is zero-padded to the batch's max rank
  ``R``, then one gather-matmul runs over the tokens: cost ~ tokens x R.
* ``mbgmv`` (S-LoRA): no padding; each adapter's tokens are computed at its own rank:
  cost ~ sum over adapters of tokens x r_u.

Numerics: adapter weights are stored in the model dtype (as vLLM does; PEFT keeps them in
float32). In bf16 the native kernel rounds ``x @ A`` and the delta to bf16, as two bf16 linears
(PEFT's lora_A and lora_B) do: long (prefill) segments on torch's batch-reduce GEMM where the
CPU has AMX, else on a GEMM of bf16 pair dot products where it has AVX512-BF16 (then the input
count must be even and the output count a multiple of 16), else BLAS; short (decode) ones on bf16
pair dot products where it has AVX512-BF16 and the rank is at most 64. In float32, and for short bf16 segments elsewhere, it accumulates in
float32 and rounds once when adding the delta.

On CPU both run in the native kernel from csrc/lora_cpu.cpp when it builds; on CUDA they
run the Triton shrink/expand kernels of triton_lora.py when triton is installed. Otherwise
(no compiler, no triton, ``use_native=False``) they run the torch paths below, which are also
references. :func:`lora_reference` is the plain per-token definition every path is tested against.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from shared.backends import BACKENDS
from shared.native_ops import cpu_lora_kernel


@dataclass
class LoraBatch:
    """One projection's LoRA work for one step.

    ``segs``: int64 ``[G, 3]`` rows ``(start, end, u)`` on the CPU;
    ``A``/``B``: per-adapter weights, indexed by ``u`` (see module docstring);
    ``max_rank``: the largest rank among them (:func:`max_rank`; every listed adapter has a
    segment). The engine keeps it with the lists, from step to step; :meth:`of` computes it.
    """

    segs: torch.Tensor
    A: list[torch.Tensor]
    B: list[torch.Tensor]
    max_rank: int

    @classmethod
    def of(cls, segs: torch.Tensor, A: list[torch.Tensor], B: list[torch.Tensor]) -> LoraBatch:
        """The batch of these segments and weights, its max rank computed."""
        return cls(segs, A, B, max_rank(A))


def max_rank(A: list[torch.Tensor]) -> int:
    """The largest rank of the ``A`` weights (0 for an empty list or empty weights), either layout."""
    return max((a.shape[1] for a in A if a.numel()), default=0)


def lora_reference(x: torch.Tensor, token_adapter: list[int], A: list[torch.Tensor], B: list[torch.Tensor],
                   pad_rank: int = 0) -> torch.Tensor:
    """Plain per-token definition: ``delta[t] = x[t] @ pad(A[u_t]) @ pad(B[u_t])``.

    ``token_adapter[t]`` is the adapter index of token t, or -1 for none. With
    ``pad_rank > 0`` the weights are explicitly zero-padded to that rank (BGMV).
    Returns ``delta: [T, out]`` in float32.
    """
    out = next(b.shape[1] for b in B)
    delta = torch.zeros(x.shape[0], out, dtype=torch.float32, device=x.device)
    for t, u in enumerate(token_adapter):
        if u < 0 or A[u].numel() == 0:
            continue
        a, b = A[u].float(), B[u].float()
        if pad_rank:
            a = torch.nn.functional.pad(a, (0, pad_rank - a.shape[1]))
            b = torch.nn.functional.pad(b, (0, 0, 0, pad_rank - b.shape[0]))
        delta[t] = x[t].float() @ a @ b
    return delta


def token_adapters(segs: torch.Tensor, num_tokens: int) -> list[int]:
    """Expand segments into the per-token adapter index list (-1 = no adapter)."""
    idx = [-1] * num_tokens
    for start, end, u in segs.tolist():
        idx[start:end] = [u] * (end - start)
    return idx


def _bgmv_torch(y: torch.Tensor, x: torch.Tensor, batch: LoraBatch, rank: int) -> None:
    """Padded gather-matmul in torch ops: ``[T,1,in] @ [T,in,R] @ [T,R,out]``."""
    tokens, weights_a, weights_b = [], [], []
    for start, end, u in batch.segs.tolist():
        if batch.A[u].numel() == 0 or end == start:
            continue
        tokens.append(torch.arange(start, end, device=x.device))
        weights_a.append(torch.nn.functional.pad(batch.A[u], (0, rank - batch.A[u].shape[1])).expand(end - start, -1, -1))
        weights_b.append(torch.nn.functional.pad(batch.B[u], (0, 0, 0, rank - batch.B[u].shape[0])).expand(end - start, -1, -1))
    if not tokens:
        return
    idx = torch.cat(tokens)
    v = torch.bmm(x[idx].unsqueeze(1), torch.cat(weights_a))
    y.index_add_(0, idx, torch.bmm(v, torch.cat(weights_b)).squeeze(1))


def _mbgmv_torch(y: torch.Tensor, x: torch.Tensor, batch: LoraBatch) -> None:
    """Segment loop in torch ops, each adapter at its own rank."""
    for start, end, u in batch.segs.tolist():
        if batch.A[u].numel() == 0 or end == start:
            continue
        y[start:end].addmm_(x[start:end] @ batch.A[u], batch.B[u])


@functools.cache
def triton_lora_kernel() -> ModuleType | None:
    """The Triton launchers (triton_lora.py), or None when triton is not installed."""
    try:
        from services.gpu_worker import triton_lora
    except ImportError:
        return None
    return triton_lora


def kernel_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [in, r], B [r, out])`` as the native CPU kernel reads them in place: in pairs
    (see the module docstring) where it reads them so on both of its bf16 paths, else unchanged
    (as are weights already in pairs)."""
    kernel = cpu_lora_kernel()
    if (kernel is None or a.device.type != "cpu" or a.dtype != torch.bfloat16 or a.dim() != 2 or b.dim() != 2
            or not kernel.packs(a.shape[1], a.shape[0], b.shape[1])):
        return a, b
    return kernel.pack_a(a), kernel.pack_b(b)


def residency_layout(device: str, native_ops: bool) -> Callable[[torch.Tensor, torch.Tensor], tuple] | None:
    """How adapter residency keeps (A, B) for an engine on ``device``: :func:`kernel_layout` where
    the native CPU kernel runs, else None (as loaded; CUDA's kernels read plain weights)."""
    return kernel_layout if native_ops and torch.device(device).type == "cpu" else None


def _plain(batch: LoraBatch) -> LoraBatch:
    """``batch`` for the torch paths, which read plain weights only."""
    if any(a.dim() != 2 for a in batch.A) or any(b.dim() != 2 for b in batch.B):
        raise ValueError("weights in pairs (kernel_layout) are read by the native CPU kernel only")
    return batch


def _native(device: torch.device, use_native: bool) -> ModuleType | None:
    """The ``lora_segments_`` kernel for ``device`` (C++ on CPU, Triton on CUDA); None: torch path."""
    if not use_native:
        return None
    if device.type == "cpu":
        return cpu_lora_kernel()
    return triton_lora_kernel() if device.type == "cuda" else None


def _bgmv_on(kernel: ModuleType | None, y: torch.Tensor, x: torch.Tensor, batch: LoraBatch) -> None:
    """:func:`bgmv` on ``kernel`` (None: the torch path)."""
    rank = batch.max_rank
    if rank == 0:
        return
    if kernel is not None:
        kernel.lora_segments_(y, x, batch.segs, batch.A, batch.B, rank)
    else:
        _bgmv_torch(y, x, _plain(batch), rank)


def _mbgmv_on(kernel: ModuleType | None, y: torch.Tensor, x: torch.Tensor, batch: LoraBatch) -> None:
    """:func:`mbgmv` on ``kernel`` (None: the torch path)."""
    if kernel is not None:
        kernel.lora_segments_(y, x, batch.segs, batch.A, batch.B, 0)
    else:
        _mbgmv_torch(y, x, _plain(batch))


_ON_KERNEL = {"bgmv": _bgmv_on, "mbgmv": _mbgmv_on}


def bgmv(y: torch.Tensor, x: torch.Tensor, batch: LoraBatch, use_native: bool = True) -> None:
    """``y += lora(x)`` with every adapter padded to the batch's max rank (in place)."""
    _bgmv_on(_native(x.device, use_native), y, x, batch)


def mbgmv(y: torch.Tensor, x: torch.Tensor, batch: LoraBatch, use_native: bool = True) -> None:
    """``y += lora(x)`` with each adapter at its own rank (in place)."""
    _mbgmv_on(_native(x.device, use_native), y, x, batch)


def _check_backend(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; choose one of {', '.join(BACKENDS)}")


def get_backend(name: str):
    """The op for backend ``name`` (``bgmv`` or ``mbgmv``)."""
    _check_backend(name)
    return bgmv if name == "bgmv" else mbgmv


def device_op(name: str, device: torch.device,
              use_native: bool) -> Callable[[torch.Tensor, torch.Tensor, LoraBatch], None]:
    """:func:`get_backend`'s op for inputs on ``device``, its kernel looked up once: an engine calls
    it 210 times a step (7 projections of 30 layers), where the lookup cost 8 us a call."""
    _check_backend(name)
    return functools.partial(_ON_KERNEL[name], _native(device, use_native))
