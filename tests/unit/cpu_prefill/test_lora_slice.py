"""lora_slice against a plain-torch definition, in both model dtypes, written into a slice of a larger view."""

from __future__ import annotations

import pytest
import torch

from services.cpu_prefill.lora_slice import lora_slice
from shared.native_ops import BLAS_SEGMENT_TOKENS, PAIRED_SEGMENT_TOKENS
from tests.unit.cpu_prefill.slice_reference import reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 8])
@pytest.mark.parametrize("segment_tokens", [5, PAIRED_SEGMENT_TOKENS, BLAS_SEGMENT_TOKENS])
def test_lora_slice_writes_only_its_rows(dtype, rank, segment_tokens):
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(7, 16, generator=gen).to(dtype)
    a, b = torch.randn(16, rank, generator=gen).to(dtype), torch.randn(rank, 24, generator=gen).to(dtype)
    area = torch.full((10, 24), float("nan"))
    lora_slice(x[2:5], a, b, area[3:6], segment_tokens)
    assert torch.allclose(area[3:6], reference(x[2:5], a, b, segment_tokens), rtol=1e-5, atol=1e-5)
    assert area[:3].isnan().all() and area[6:].isnan().all()  # rows of other CPU workers untouched


def test_a_swapped_factor_is_not_the_delta():
    gen = torch.Generator().manual_seed(0)
    x, a, b = torch.randn(4, 8, generator=gen), torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen)
    out = torch.empty(4, 8)
    lora_slice(x, b, a, out, 4)
    assert not torch.allclose(out, reference(x, a, b, 4), atol=1e-3)
