"""The one op a CPU prefill worker runs: a token slice's LoRA delta, ``x @ A @ B``.

It computes as the CPU device path (``csrc/lora_cpu.cpp``) computes the same segment, so that a
CPU-assisted prefill gives the tokens a device-resident one would. In bf16, where the kernel's
pair GEMMs run for the shape (``long_delta``: the batch-reduce GEMM on AMX, else bf16 pair dot
products), a segment of at least ``PAIRED_SEGMENT_TOKENS`` tokens goes through them: two GEMMs,
``x @ A`` and the delta each rounded to bf16. Elsewhere a segment of at least
``BLAS_SEGMENT_TOKENS`` goes through torch's two GEMMs in the model dtype, rounded the same way.
A shorter one in bf16 rounds the same two products on the kernel's bf16 pair dot products
(``short_delta``) where the device path uses them, and otherwise runs in the native kernel itself,
in float32, rounded once, when the worker adds it (plain torch in float32 where the kernel does
not build).
"""

from __future__ import annotations

import torch

from shared.native_ops import BLAS_SEGMENT_TOKENS, PAIRED_SEGMENT_TOKENS, cpu_lora_kernel


def lora_slice(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, segment_tokens: int) -> None:
    """``out = x @ A @ B`` for ``x: [n, in]``, ``A: [in, r]``, ``B: [r, out]`` (one dtype), written into
    the float32 view ``out: [n, out]``; ``segment_tokens``: the whole segment's length (``n`` is a slice of it)."""
    kernel = cpu_lora_kernel()
    paired = kernel is not None and x.dtype == torch.bfloat16 and kernel.long_delta_available(a.shape[1], a.shape[0], b.shape[1])
    if paired and segment_tokens >= PAIRED_SEGMENT_TOKENS:
        kernel.long_delta(out, x, a.contiguous(), b.contiguous())
        return
    if segment_tokens >= BLAS_SEGMENT_TOKENS:
        out.copy_(torch.mm(torch.mm(x, a), b))
        return
    if kernel is None:
        torch.mm(torch.mm(x.float(), a.float()), b.float(), out=out)
        return
    if x.dtype == torch.bfloat16 and kernel.short_delta_available(a.shape[1], a.shape[0]):
        kernel.short_delta(out, x, a.contiguous(), b.contiguous())
        return
    out.zero_()
    rows = torch.tensor([[0, x.shape[0], 0]], dtype=torch.int64)
    kernel.lora_segments_(out, x.float(), rows, [a.float()], [b.float()], 0)


def lora_slice_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain float32 definition: ``[n, out]``."""
    return x.float() @ a.float() @ b.float()
