"""The delta a CPU prefill worker must write for a token slice, in plain torch."""

from __future__ import annotations

import torch

from shared.native_ops import BLAS_SEGMENT_TOKENS, cpu_lora_kernel


def reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, segment_tokens: int) -> torch.Tensor:
    """How the CPU device path rounds a segment's delta (csrc/lora_cpu.cpp): bf16 rounds x @ A and
    the delta (long segments through BLAS or the kernel's GEMMs, short ones on its bf16 pair dot
    products where they run); float32, and short bf16 segments elsewhere, sum in float32."""
    kernel = cpu_lora_kernel()
    short_rounds = kernel is not None and kernel.short_delta_available(a.shape[1], a.shape[0])
    if x.dtype == torch.bfloat16 and (segment_tokens >= BLAS_SEGMENT_TOKENS or short_rounds):
        return (x @ a @ b).float()
    return x.float() @ a.float() @ b.float()
