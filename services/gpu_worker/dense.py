"""A base projection's weight, prepacked for the CPU's matrix units where that is faster.

On a CPU with bf16 matrix instructions (AMX or AVX512-BF16), oneDNN runs a bf16 GEMM
about 1.6× faster at decode batch sizes when the weight is reordered once into its blocked
layout, instead of on every call as ``F.linear`` does (``docs/engine_performance.md``).
Batches of up to SMALL_BATCH_TOKENS tokens go to csrc/dense_cpu.cpp instead, which reads the
same packed buffer through torch's batch-reduce GEMM, 15-25 % faster there; the buffer is used
only after it is checked to hold exactly :func:`vnni_blocks` of the weight.
Elsewhere (CUDA, float32, CPUs without bf16 units) the weight stays a plain tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.native_ops import dense_kernel

# The batch size oneDNN chooses the packed layout for. A hint of 1 picks a layout that runs the
# engine's decode batches (16-64 tokens) and its 2k-token prefill steps 12-19 % slower than any
# hint from 16 up, which all measure the same (docs/engine_performance.md, round 4).
PACKED_FOR_TOKENS = 64

# Batches up to this many tokens run on the packed blocks in csrc/dense_cpu.cpp; from 40 tokens
# up oneDNN's own matmul is faster (docs/engine_performance.md, round 5).
SMALL_BATCH_TOKENS = 32
BLOCK = 32  # output columns per packed block


def prepacks(weight: torch.Tensor) -> bool:
    """Whether :class:`DenseWeight` prepacks this weight: bf16 on a CPU whose oneDNN has bf16 kernels."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def vnni_blocks(weight: torch.Tensor) -> torch.Tensor:
    """``[N, K] -> [N / 32, K * 32]``: blocks of 32 output columns, each the K inputs as pairs,
    ``block[j][(k // 2) * 64 + 2 * c + k % 2] = weight[32 * j + c, k]``: oneDNN's AB16b32a2b
    layout, and the B operand of the batch-reduce GEMM. Needs N % 32 == 0 and even K."""
    n, k = weight.shape
    return weight.view(n // BLOCK, BLOCK, k // 2, 2).permute(0, 2, 1, 3).reshape(n // BLOCK, k * BLOCK)


def packed_blocks(packed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's packed ``weight`` as :func:`vnni_blocks`, sharing its buffer, or None where that
    buffer is laid out otherwise (another CPU, another oneDNN) or the kernel is not built."""
    n, k = weight.shape
    kernel = dense_kernel()
    if kernel is None or not kernel.available() or n % BLOCK or k % 2:
        return None
    blocks = kernel.packed_blocks(packed, n, k)
    return blocks if blocks is not None and torch.equal(blocks, vnni_blocks(weight)) else None


class DenseWeight:
    """``y = x @ W.T`` for a fixed ``W: [out, in]``; call with ``x: [T, in]`` -> ``[T, out]``.

    The reference is ``F.linear(x, W)``: the packed paths run the same products in blocked
    order, so results agree to bf16 rounding (not bit for bit).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.numel() * weight.element_size()
        self.packed = prepacks(weight)
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACKED_FOR_TOKENS) if self.packed else weight
        self.blocks = packed_blocks(self.weight, weight) if self.packed else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is not None and x.shape[0] <= SMALL_BATCH_TOKENS and x.stride(-1) == 1:
            return dense_kernel().small_batch_linear(x, self.blocks)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return F.linear(x, self.weight)
