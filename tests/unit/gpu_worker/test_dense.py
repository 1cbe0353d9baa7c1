"""DenseWeight (a base projection, prepacked for oneDNN on bf16 CPUs) and the small-batch kernel on its
packed blocks, against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.gpu_worker.dense import (AMX_SMALL_BATCH_TOKENS, BLOCK_WIDTHS, DOT_SMALL_BATCH_TOKENS, DenseWeight,
                                       prepacks, vnni_blocks)
from shared.native_ops import dense_kernel


def _weight(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(192, 96, generator=torch.Generator().manual_seed(0)).to(dtype)


def test_float32_stays_a_plain_tensor():
    w = _weight(torch.float32)
    dense = DenseWeight(w)
    assert not dense.packed and dense.weight is w and dense.small_batch_tokens == 0
    for tokens in (5, 0):
        x = torch.randn(tokens, 96)
        assert torch.equal(dense(x), F.linear(x, w))


@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
def test_bf16_matches_linear(tokens):
    w = _weight(torch.bfloat16)
    dense = DenseWeight(w)
    assert dense.packed == prepacks(w)
    assert (dense.out_features, dense.in_features, dense.nbytes) == (192, 96, 192 * 96 * 2)
    x = torch.randn(tokens, 96, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    out, ref = dense(x), F.linear(x, w)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    # the same products summed in oneDNN's blocked order: equal up to one bf16 rounding step
    torch.testing.assert_close(out, ref, rtol=1.6e-2, atol=1e-2)


def test_bf16_reads_strided_rows():
    w = _weight(torch.bfloat16)
    wide = torch.randn(9, 200, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x = wide[:, 50:146]
    torch.testing.assert_close(DenseWeight(w)(x), F.linear(x, w), rtol=1.6e-2, atol=1e-2)


# --- decode-sized batches on oneDNN's packed blocks (csrc/dense_cpu.cpp) ---

@pytest.fixture(scope="module")
def kernel():
    module = dense_kernel()
    if module is None or not module.available():
        pytest.skip("no C++ compiler, or neither AMX nor AVX512-BF16 here: every batch goes to oneDNN")
    return module


@pytest.mark.parametrize("width", BLOCK_WIDTHS)
def test_vnni_blocks_puts_each_weight_where_its_docstring_says(width):
    w = torch.arange(128 * 6, dtype=torch.float32).view(128, 6)
    blocks = vnni_blocks(w, width)
    assert blocks.shape == (128 // width, 6 * width)
    for n in range(128):
        for k in range(6):
            assert blocks[n // width, (k // 2) * 2 * width + 2 * (n % width) + k % 2] == w[n, k]


@pytest.mark.parametrize("width", BLOCK_WIDTHS)
@pytest.mark.parametrize("tokens", [1, 5, 6, 7, 15, 16, 17, 48, 300])
@pytest.mark.parametrize("shape", [(64, 40), (192, 576), (3072, 576)])
def test_small_batch_linear_matches_linear(kernel, width, tokens, shape):
    # token counts on and off the dot products' 6-row blocks and the AMX tiles' 32 rows
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    out = kernel.small_batch_linear(x, vnni_blocks(w, width))
    assert out.shape == (tokens, shape[0]) and out.dtype == torch.bfloat16
    # float accumulation, one rounding at the end: within one bf16 step of the float32 product
    ref = F.linear(x.float(), w.float())
    torch.testing.assert_close(out.float(), ref, rtol=8e-3, atol=1e-2)


def test_small_batch_linear_reads_strided_rows_and_empty_batches(kernel):
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    wide = torch.randn(9, 200, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    x = wide[:, 50:146]
    blocks = vnni_blocks(w, 32)
    assert torch.equal(kernel.small_batch_linear(x, blocks), kernel.small_batch_linear(x.contiguous(), blocks))
    assert kernel.small_batch_linear(x[:0], blocks).shape == (0, 64)


def test_small_batch_linear_refuses_blocks_it_cannot_read(kernel):
    w = torch.randn(64, 96).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="inputs per column"):  # blocks of another input count
        kernel.small_batch_linear(torch.randn(2, 80).to(torch.bfloat16), vnni_blocks(w, 32))
    with pytest.raises(RuntimeError, match="inputs per column"):  # a block width it has no kernel for
        kernel.small_batch_linear(torch.randn(2, 96).to(torch.bfloat16), vnni_blocks(w, 8))


def test_packed_blocks_refuses_a_width_it_has_no_kernel_for(kernel):
    w = _weight(torch.bfloat16)
    if not prepacks(w):
        pytest.skip("oneDNN has no bf16 kernels here")
    with pytest.raises(RuntimeError, match="block width"):
        kernel.packed_blocks(DenseWeight(w).weight, 192, 96, 8)


def test_packed_weight_serves_small_batches_from_its_own_buffer(kernel):
    w = _weight(torch.bfloat16)
    dense = DenseWeight(w)
    if not dense.packed:
        pytest.skip("oneDNN has no bf16 kernels here")
    if dense.blocks is None:
        pytest.skip("this oneDNN lays bf16 weights out otherwise: small batches go to oneDNN")
    width = dense.blocks.shape[1] // 96
    assert width in BLOCK_WIDTHS and torch.equal(dense.blocks, vnni_blocks(w, width))
    assert dense.blocks.data_ptr() == kernel.packed_blocks(dense.weight, 192, 96, width).data_ptr()  # shared
    assert dense.small_batch_tokens == (AMX_SMALL_BATCH_TOKENS if kernel.matrix_units() else DOT_SMALL_BATCH_TOKENS)
    x = torch.randn(dense.small_batch_tokens + 1, 96, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    assert torch.equal(dense(x[:-1]), kernel.small_batch_linear(x[:-1], dense.blocks))
    # one token more goes to oneDNN's own matmul
    assert torch.equal(dense(x), torch.ops.mkldnn._linear_pointwise(x, dense.weight, None, "none", [], ""))


def test_padded_layouts_are_never_read_as_blocks():
    w = torch.randn(64, 30, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)  # oneDNN pads K to 32
    dense = DenseWeight(w)
    assert dense.blocks is None and dense.small_batch_tokens == 0
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    torch.testing.assert_close(dense(x), F.linear(x, w), rtol=1.6e-2, atol=1e-2)
