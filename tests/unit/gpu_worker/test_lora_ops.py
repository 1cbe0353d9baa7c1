"""BGMV and MBGMV (native kernel and torch paths) against the plain per-token reference."""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.lora_ops import LoraBatch, bgmv, get_backend, lora_reference, mbgmv, token_adapters


def make_batch(ranks: list[int], lengths: list[int | None], fan_in: int, fan_out: int, dtype, seed=0):
    """Segments in order; a length paired with None rank is a run of base-model tokens."""
    g = torch.Generator().manual_seed(seed)
    A = [torch.randn(fan_in, r, generator=g).to(dtype) if r else torch.empty(0, 0, dtype=dtype) for r in ranks]
    B = [torch.randn(r, fan_out, generator=g).to(dtype) * 0.1 if r else torch.empty(0, 0, dtype=dtype) for r in ranks]
    rows, pos = [], 0
    for u, n in enumerate(lengths):
        if n is None:
            continue
        rows.append((pos, pos + n, u))
        pos += n
    total = pos + 3  # trailing base-model tokens
    return LoraBatch(torch.tensor(rows, dtype=torch.int64).reshape(-1, 3), A, B), total


CASES = [
    # ranks, tokens per adapter (decode-like and prefill-like runs), mixed with rank 1 and an absent projection
    ([8, 16, 32, 64], [1, 3, 2, 5]),
    ([1, 64, 0, 8], [4, 1, 2, 40]),
    ([16], [70]),
]


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("ranks,lengths", CASES)
@pytest.mark.parametrize("fan", [(48, 80), (64, 16)])
def test_backends_match_reference(dtype, atol, native, ranks, lengths, fan):
    batch, total = make_batch(ranks, lengths, *fan, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(total, fan[0], generator=g).to(dtype)
    base = torch.randn(total, fan[1], generator=g).to(dtype)
    idx = token_adapters(batch.segs, total)
    for op, pad in ((bgmv, batch.max_rank), (mbgmv, 0)):
        y = base.clone()
        op(y, x, batch, use_native=native)
        want = base.float() + lora_reference(x, idx, batch.A, batch.B, pad_rank=pad)
        assert torch.allclose(y.float(), want, atol=atol, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5), op.__name__
        untouched = [t for t, u in enumerate(idx) if u < 0 or batch.A[u].numel() == 0]
        assert torch.equal(y[untouched], base[untouched]), "tokens without an adapter must be left alone"


def test_strided_output_slice_is_updated_in_place():
    batch, total = make_batch([8, 4], [2, 3], 32, 16, torch.float32)
    x = torch.randn(total, 32)
    fused = torch.zeros(total, 40)
    view = fused[:, 8:24]  # a column slice, as q/k/v land in a fused qkv output
    for native in (True, False):
        fused.zero_()
        mbgmv(view, x, batch, use_native=native)
        want = lora_reference(x, token_adapters(batch.segs, total), batch.A, batch.B)
        assert torch.allclose(fused[:, 8:24], want, atol=1e-5)
        assert fused[:, :8].abs().sum() == 0 and fused[:, 24:].abs().sum() == 0


def test_reference_padding_changes_nothing():
    batch, total = make_batch([8, 32], [2, 2], 24, 24, torch.float32)
    x = torch.randn(total, 24)
    idx = token_adapters(batch.segs, total)
    # the same sums, but a padded matmul may take another kernel: equal up to float32 rounding
    torch.testing.assert_close(lora_reference(x, idx, batch.A, batch.B, 64), lora_reference(x, idx, batch.A, batch.B))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown LoRA backend"):
        get_backend("sgmv")
