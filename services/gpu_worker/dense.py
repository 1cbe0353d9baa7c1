"""A base projection's weight, prepacked for the CPU's matrix units where that is faster.

On a CPU with bf16 matrix instructions (AMX or AVX512-BF16), oneDNN runs a bf16 GEMM
about 1.6× faster at decode batch sizes when the weight is reordered once into its blocked
layout, instead of on every call as ``F.linear`` does (``docs/engine_performance.md``).
Elsewhere (CUDA, float32, CPUs without bf16 units) the weight stays a plain tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The batch size oneDNN chooses the packed layout for. A hint of 1 picks a layout that runs the
# engine's decode batches (16-64 tokens) and its 2k-token prefill steps 12-19 % slower than any
# hint from 16 up, which all measure the same (docs/engine_performance.md, round 4).
PACKED_FOR_TOKENS = 64


def prepacks(weight: torch.Tensor) -> bool:
    """Whether :class:`DenseWeight` prepacks this weight: bf16 on a CPU whose oneDNN has bf16 kernels."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class DenseWeight:
    """``y = x @ W.T`` for a fixed ``W: [out, in]``; call with ``x: [T, in]`` -> ``[T, out]``.

    The reference is ``F.linear(x, W)``: the packed path runs the same products in oneDNN's
    blocked order, so results agree to bf16 rounding (not bit for bit).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.numel() * weight.element_size()
        self.packed = prepacks(weight)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_FOR_TOKENS) if self.packed else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return F.linear(x, self.weight)
