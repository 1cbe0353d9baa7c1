"""A base projection's weight, prepacked for the CPU's matrix units where that is faster.

On a CPU with bf16 matrix instructions (AMX or AVX512-BF16), oneDNN runs a bf16 GEMM
about 1.6× faster at decode batch sizes when the weight is reordered once into its blocked
layout, instead of on every call as ``F.linear`` does (``docs/engine_performance.md``).
Smaller batches go to csrc/dense_cpu.cpp instead, which reads the same packed buffer: through
torch's batch-reduce GEMM with AMX (up to AMX_SMALL_BATCH_TOKENS, 15-25 % faster there), else on
the bf16 dot-product instruction (up to DOT_SMALL_BATCH_TOKENS; 1.5× faster at 1 token, 1.1× at
64). The buffer is
used only after it is checked to hold exactly :func:`vnni_blocks` of the weight, at one of the
block widths oneDNN uses (BLOCK_WIDTHS). Elsewhere (CUDA, float32, CPUs without bf16 units) the
weight stays a plain tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared.native_ops import dense_kernel

# The batch size oneDNN chooses the packed layout for. A hint of 1 picks a layout that runs the
# engine's decode batches (16-64 tokens) and its 2k-token prefill steps 12-19 % slower than any
# hint from 16 up, which all measure the same (docs/engine_performance.md, round 4).
PACKED_FOR_TOKENS = 64

# Batches up to this many tokens run on the packed blocks in csrc/dense_cpu.cpp. With AMX, from 40
# tokens up oneDNN's own matmul is faster (docs/engine_performance.md, round 5). On the dot
# products (AVX512-BF16 without AMX) the kernel is 1.5x faster at 1 token and 1.04-1.1x at
# 64-256; from 512 tokens the two are within a few percent either way, and at 4,096 oneDNN is
# 10 % faster (round 11).
AMX_SMALL_BATCH_TOKENS = 32
DOT_SMALL_BATCH_TOKENS = 256
BLOCK_WIDTHS = (64, 32, 16)  # output columns per packed block that the kernel reads (oneDNN: 32 on AMX, 64 without)


def prepacks(weight: torch.Tensor) -> bool:
    """Whether :class:`DenseWeight` prepacks this weight: bf16 on a CPU whose oneDNN has bf16 kernels."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def vnni_blocks(weight: torch.Tensor, width: int) -> torch.Tensor:
    """``[N, K] -> [N / W, K * W]`` for block width ``W``: blocks of W output columns, each the K
    inputs as pairs, ``block[j][(k // 2) * 2W + 2 * c + k % 2] = weight[W * j + c, k]``: oneDNN's
    AB16b32a2b (W = 32) or AB16b64a2b (W = 64) layout, and the right-hand operand of the batch-reduce
    GEMM and of the dot-product GEMM. Needs N % W == 0 and even K."""
    n, k = weight.shape
    return weight.view(n // width, width, k // 2, 2).permute(0, 2, 1, 3).reshape(n // width, k * width)


def packed_blocks(packed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's packed ``weight`` as :func:`vnni_blocks` at the width oneDNN chose, sharing its
    buffer, or None where that buffer is laid out otherwise (another CPU, another oneDNN) or the
    kernel does not run here."""
    n, k = weight.shape
    kernel = dense_kernel()
    if kernel is None or not kernel.available() or k % 2:
        return None
    for width in BLOCK_WIDTHS:
        if n % width:
            continue
        blocks = kernel.packed_blocks(packed, n, k, width)
        if blocks is not None and torch.equal(blocks, vnni_blocks(weight, width)):
            return blocks
    return None


def small_batch_tokens() -> int:
    """Batches up to this many tokens go to the packed blocks' kernel (0: none, it does not run here)."""
    kernel = dense_kernel()
    if kernel is None or not kernel.available():
        return 0
    return AMX_SMALL_BATCH_TOKENS if kernel.matrix_units() else DOT_SMALL_BATCH_TOKENS


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
        self.small_batch_tokens = small_batch_tokens() if self.blocks is not None else 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is not None and x.shape[0] <= self.small_batch_tokens and x.stride(-1) == 1:
            return dense_kernel().small_batch_linear(x, self.blocks)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [], "")
        return F.linear(x, self.weight)
