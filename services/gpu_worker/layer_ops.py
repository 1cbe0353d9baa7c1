"""The decoder layer's elementwise ops: RMSNorm (with the residual add folded in) and SiLU(gate) * up.

Each has a plain-torch reference (HF Llama's rounding: float32 math, cast back where HF casts).
On the CPU the fused kernels of ``csrc/layer_ops_cpu.cpp`` run instead: one pass over the rows
where eager torch makes five to seven, which at prefill sizes costs as much as a GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.native_ops import layer_ops_kernel


def native(x: torch.Tensor) -> bool:
    """Whether the fused CPU kernels serve ``x`` (float32 or bf16 rows on the CPU, kernel built);
    also the rule of :meth:`~services.gpu_worker.rope.RotaryEmbedding.apply`."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and x.stride(-1) == 1 and layer_ops_kernel() is not None)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale. ``x: [T, H]``."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up: [T, 2I]`` (gate | up) -> ``SiLU(gate) * up: [T, I]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of ``x: [T, H]`` (see :func:`rms_norm_reference`)."""
    if native(x):
        return layer_ops_kernel().rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm_(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x += delta`` in place (the residual stream), then return RMSNorm of the new ``x``. ``[T, H]``."""
    if native(x) and native(delta) and x.is_contiguous():
        return layer_ops_kernel().add_rms_norm_(x, delta, weight, eps)
    x.add_(delta)
    return rms_norm_reference(x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up: [T, 2I]`` -> ``[T, I]`` (see :func:`silu_mul_reference`)."""
    if native(gate_up):
        return layer_ops_kernel().silu_mul(gate_up)
    return silu_mul_reference(gate_up)
