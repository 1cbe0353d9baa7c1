"""BGMV and MBGMV (native kernel and torch paths) against the plain per-token reference; the kernel's
long bf16 segments against their two-GEMM rounding."""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.lora_ops import (LoraBatch, bgmv, device_op, get_backend, kernel_layout, lora_reference,
                                          max_rank, mbgmv, token_adapters)
from shared.native_ops import cpu_lora_kernel


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
    return LoraBatch.of(torch.tensor(rows, dtype=torch.int64).reshape(-1, 3), A, B), total


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
    with pytest.raises(ValueError, match="unknown LoRA backend"):
        device_op("sgmv", torch.device("cpu"), True)


@pytest.mark.parametrize("native", [True, False])
def test_device_op_is_its_backend(native):
    """The engine's op, its kernel looked up once, gives the per-call lookup's result bit for bit."""
    batch, total = make_batch([8, 16, 64, 0], [1, 3, 2, 40], 64, 48, torch.bfloat16)
    x = torch.randn(total, 64, generator=torch.Generator().manual_seed(3)).bfloat16()
    for name in ("bgmv", "mbgmv"):
        bound, looked_up = torch.zeros(total, 48).bfloat16(), torch.zeros(total, 48).bfloat16()
        device_op(name, torch.device("cpu"), native)(bound, x, batch)
        get_backend(name)(looked_up, x, batch, use_native=native)
        assert torch.equal(bound, looked_up) and bound.abs().sum() > 0, name


def test_batch_of_computes_the_max_rank_of_either_layout():
    batch, _ = make_batch([8, 0, 33], [1, 1, 1], 64, 48, torch.bfloat16)
    assert batch.max_rank == max_rank(batch.A) == 33
    laid = [kernel_layout(a, b)[0] if a.numel() else a for a, b in zip(batch.A, batch.B)]
    assert max_rank(laid) == 33 and max_rank([]) == 0


# --- long bf16 segments (prefill) on the kernel's batch-reduce GEMM (csrc/lora_cpu.cpp) ---

LONG_RANKS, LONG_LENGTHS = [1, 7, 64, 80], [33, 17, 65, 32]  # rank 80: above the GEMM path's 64, to BLAS;
# 17 tokens: long only where the batch-reduce GEMM runs (PAIRED_SEGMENT_TOKENS), else the float loop


def _long_kernel():
    kernel = cpu_lora_kernel()
    if kernel is None or not kernel.long_delta_available(8, 96, 208):
        pytest.skip("no C++ compiler, or neither the bf16 batch-reduce GEMM nor AVX512-BF16 here: long segments "
                    "go to BLAS")
    return kernel


def _two_gemms(x, a, b):
    """The long-segment definition: x @ A rounded to bf16, times B, rounded to bf16 (float sums)."""
    return ((x.float() @ a.float()).bfloat16().float() @ b.float()).bfloat16()


def _bf16_steps(t):
    """One bf16 step (ulp) at each value of the float tensor ``t``."""
    return torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(t.abs().clamp_min(1e-30))))


def _rounding_slack(x, a, b, want):
    """|kernel - two-GEMM definition| allowed per output: float sums in another order may round
    any x @ A value one bf16 step apart (B carries it on), and the delta and the sum one step each."""
    v = (x.float() @ a.float()).bfloat16().float()
    return _bf16_steps(v) @ b.float().abs() + _bf16_steps(v @ b.float()) + 2 * _bf16_steps(want.float())


def _check_rounds_like_two_gemms(ranks, lengths, in_features, out=200):
    """``out`` 200 and 208 end in a partial 64-column block; 200 is no multiple of 16 (so without AMX
    long segments go to BLAS), 208 is (the bf16 dot-product GEMM takes them)."""
    batch, total = make_batch(ranks, lengths, in_features, out, torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(total, in_features, generator=g).to(torch.bfloat16)
    fused = torch.randn(total, out + 10, generator=g).to(torch.bfloat16)
    base = fused.clone()
    cols = slice(5, 5 + out)
    for op in (mbgmv, bgmv):
        fused.copy_(base)
        op(fused[:, cols], x, batch)
        for start, end, u in batch.segs.tolist():
            a, b = batch.A[u], batch.B[u]
            want = (base[start:end, cols].float() + _two_gemms(x[start:end], a, b).float()).bfloat16()
            error = (fused[start:end, cols].float() - want.float()).abs()
            slack = _rounding_slack(x[start:end], a, b, want)
            assert (error <= slack).all(), (op.__name__, u, float((error - slack).max()))
        assert torch.equal(fused[:, :5], base[:, :5]) and torch.equal(fused[:, 5 + out:], base[:, 5 + out:])
        assert torch.equal(fused[-3:], base[-3:])  # the trailing base-model tokens


@pytest.mark.parametrize("out", [200, 208])
def test_long_bf16_segments_round_like_two_gemms(out):
    _long_kernel()
    _check_rounds_like_two_gemms(LONG_RANKS, LONG_LENGTHS, 96, out)


@pytest.mark.parametrize("in_features", [96, 97])
def test_short_bf16_segments_round_like_two_gemms(in_features):
    """Decode-sized segments (1-31 tokens: the kernel's bf16 pair dot products up to rank 64, its
    float loop above); an odd input count takes the float loop at every rank."""
    if cpu_lora_kernel() is None:
        pytest.skip("no C++ compiler here")
    _check_rounds_like_two_gemms([1, 7, 64, 80, 16], [1, 3, 5, 31, 4], in_features)


def _check_delta_is_what_a_segment_gets(delta_op, ranks, lengths, sliced, out):
    batch, total = make_batch(ranks, lengths, 96, out, torch.bfloat16, seed=4)
    g = torch.Generator().manual_seed(5)
    x, base = torch.randn(total, 96, generator=g).to(torch.bfloat16), torch.randn(total, out, generator=g).to(torch.bfloat16)
    y = base.clone()
    mbgmv(y, x, batch)
    for start, end, u in batch.segs.tolist():
        delta = torch.empty(end - start, out)
        delta_op(delta, x[start:end], batch.A[u], batch.B[u])
        assert torch.equal(y[start:end], (base[start:end].float() + delta).bfloat16())
        part = torch.empty(end - start - sliced, out)  # a CPU prefill worker's slice of the segment
        delta_op(part, x[start + sliced:end], batch.A[u], batch.B[u])
        assert torch.equal(part, delta[sliced:])


def test_long_delta_is_what_a_segment_gets_whole_or_sliced():
    _check_delta_is_what_a_segment_gets(_long_kernel().long_delta, LONG_RANKS[:3], LONG_LENGTHS[:3], sliced=10, out=208)


def _short_kernel():
    kernel = cpu_lora_kernel()
    if kernel is None or not kernel.short_delta_available(8, 576):
        pytest.skip("no C++ compiler or no AVX512-BF16 here: short bf16 segments run in float32")
    return kernel


def test_short_delta_is_what_a_segment_gets_whole_or_sliced():
    _check_delta_is_what_a_segment_gets(_short_kernel().short_delta, [1, 7, 64], [7, 3, 31], sliced=2, out=200)


@pytest.mark.parametrize("delta_op,rows", [(lambda: _long_kernel().long_delta, 40),
                                           (lambda: _short_kernel().short_delta, 5)], ids=["long", "short"])
def test_segment_deltas_refuse_bad_operands(delta_op, rows):
    delta = delta_op()
    x, a, b = torch.randn(rows, 16).bfloat16(), torch.randn(16, 8).bfloat16(), torch.randn(8, 24).bfloat16()
    with pytest.raises(RuntimeError, match="float32"):
        delta(torch.empty(rows, 24).bfloat16(), x, a, b)
    with pytest.raises(RuntimeError, match="shape"):
        delta(torch.empty(rows, 24), x, b.t().contiguous(), b)
    with pytest.raises(RuntimeError, match="bf16"):
        delta(torch.empty(rows, 24), x.float(), a.float(), b.float())
    with pytest.raises(RuntimeError, match="up to 64"):
        delta(torch.empty(rows, 24), x, torch.randn(16, 80).bfloat16(), torch.randn(80, 24).bfloat16())
