"""The native greedy-sampling kernel against its plain-torch reference (NaN filter + argmax)."""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.sampling import greedy_tokens, greedy_tokens_reference
from shared.native_ops import greedy_kernel

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def kernel():
    module = greedy_kernel()
    if module is None:
        pytest.skip("no C++ compiler here: sampling uses the torch path")
    return module


def test_random_rows_match_the_reference(kernel):
    logits = torch.randn(64, 49152, generator=torch.Generator().manual_seed(0))
    assert kernel.greedy_tokens(logits).tolist() == greedy_tokens_reference(logits)


@pytest.mark.parametrize("row", [
    [1.0, NAN, 3.0, 3.0, -2.0],   # NaN never wins; a tie goes to the lowest index
    [NAN, NAN, NAN, NAN, NAN],    # nothing usable: 0
    [-INF, -INF, -INF, -INF, -INF],
    [NAN, -INF, -5.0, NAN, -INF],
    [2.0, INF, NAN, INF, 1e38],   # +inf beats every finite value; the first one wins
    [-0.0, 0.0, -1.0, NAN, -0.0],
])
def test_odd_rows_match_the_reference(kernel, row):
    logits = torch.tensor([row] * 3, dtype=torch.float32)
    logits[1] = logits[1].flip(0)
    assert kernel.greedy_tokens(logits).tolist() == greedy_tokens_reference(logits)


def test_strided_rows_and_the_dispatch(kernel):
    wide = torch.randn(6, 300, generator=torch.Generator().manual_seed(1))
    logits = wide[:, 10:210]  # contiguous rows, row stride 300
    assert greedy_tokens(logits) == greedy_tokens_reference(logits)
    assert greedy_tokens(logits.double()) == greedy_tokens_reference(logits.double())  # torch path


def test_bad_input_is_refused(kernel):
    with pytest.raises(RuntimeError, match="float32"):
        kernel.greedy_tokens(torch.zeros(2, 4, dtype=torch.bfloat16))
