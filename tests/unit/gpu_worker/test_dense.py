"""DenseWeight (a base projection, prepacked for oneDNN on bf16 CPUs) against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from services.gpu_worker.dense import DenseWeight, prepacks


def _weight(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(192, 96, generator=torch.Generator().manual_seed(0)).to(dtype)


def test_float32_stays_a_plain_tensor():
    w = _weight(torch.float32)
    dense = DenseWeight(w)
    assert not dense.packed and dense.weight is w
    x = torch.randn(5, 96)
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
