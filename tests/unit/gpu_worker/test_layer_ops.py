"""The fused CPU elementwise ops of a decoder layer against their plain-torch references."""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.layer_ops import rms_norm_reference, silu_mul_reference
from shared.native_ops import layer_ops_kernel


@pytest.fixture(scope="module")
def kernel():
    module = layer_ops_kernel()
    if module is None:
        pytest.skip("no C++ compiler here: the engine uses the torch path")
    return module


def _rows(t: int, h: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return (torch.randn(t, h, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


def _mismatch(out: torch.Tensor, ref: torch.Tensor) -> float:
    """The fraction of elements that differ (the kernels sum squares in another order than torch)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    return (out != ref).float().mean().item()


@pytest.mark.parametrize("t,h", [(1, 576), (37, 64), (300, 576)])
def test_rms_norm(kernel, t, h):
    x, w = _rows(t, h, torch.bfloat16, 1), _rows(1, h, torch.bfloat16, 2)[0]
    assert _mismatch(kernel.rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5)) < 0.002
    xf, wf = x.float(), w.float()
    torch.testing.assert_close(kernel.rms_norm(xf, wf, 1e-5), rms_norm_reference(xf, wf, 1e-5), rtol=1e-6, atol=1e-6)


def test_rms_norm_reads_strided_rows(kernel):
    wide = _rows(20, 1000, torch.bfloat16, 3)
    x, w = wide[:, 100:676], _rows(1, 576, torch.bfloat16, 4)[0]
    assert _mismatch(kernel.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)) < 0.002


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_add_rms_norm_updates_the_residual(kernel, dtype):
    x, d, w = _rows(50, 576, dtype, 5), _rows(50, 576, dtype, 6), _rows(1, 576, dtype, 7)[0]
    expected_x = x + d
    expected = rms_norm_reference(expected_x, w, 1e-5)
    out = kernel.add_rms_norm_(x, d, w, 1e-5)
    assert torch.equal(x, expected_x)
    if dtype == torch.bfloat16:
        assert _mismatch(out, expected) < 0.002
    else:
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul(kernel, dtype):
    gate_up = _rows(70, 2 * 1536, dtype, 8)
    out, ref = kernel.silu_mul(gate_up), silu_mul_reference(gate_up)
    if dtype == torch.bfloat16:
        assert _mismatch(out, ref) < 0.002
        torch.testing.assert_close(out, ref, rtol=8e-3, atol=0)  # at most one bf16 step apart
    else:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_non_finite_values_propagate(kernel):
    x = _rows(2, 64, torch.bfloat16, 9)
    x[0, 3] = float("nan")
    w = torch.ones(64, dtype=torch.bfloat16)
    out = kernel.rms_norm(x, w, 1e-5)
    assert out[0].isnan().all() and out[1].isfinite().all()
    gate_up = _rows(1, 8, torch.bfloat16, 10)
    gate_up[0, 5] = float("inf")  # up = inf
    assert kernel.silu_mul(gate_up)[0, 1].isinf()


def test_bad_shapes_are_refused(kernel):
    with pytest.raises(RuntimeError, match="weight"):
        kernel.rms_norm(_rows(2, 8, torch.float32, 0), torch.ones(7), 1e-5)
    with pytest.raises(RuntimeError, match="even"):
        kernel.silu_mul(_rows(2, 7, torch.float32, 0))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernel.silu_mul(_rows(2, 8, torch.float16, 0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_on_strided_heads(kernel, dtype):
    from services.gpu_worker.rope import RotaryEmbedding

    rope = RotaryEmbedding(64, 512, 10000.0, None, dtype, "cpu")
    qkv = _rows(33, 9 * 64 + 2 * 3 * 64, dtype, 11)  # q | k | v of 33 tokens, as the fused projection
    q, k = qkv[:, :576].view(-1, 9, 64), qkv[:, 576:768].view(-1, 3, 64)
    positions = torch.randint(0, 512, (33,), generator=torch.Generator().manual_seed(12))
    ref_q, ref_k = rope.reference(q, k, positions)
    out_q, out_k = rope.apply(q, k, positions)
    assert out_q.is_contiguous() and out_k.is_contiguous()
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)


def test_rope_refuses_positions_past_its_table(kernel):
    from services.gpu_worker.rope import RotaryEmbedding

    rope = RotaryEmbedding(16, 8, 10000.0, None, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="position"):
        kernel.rope(torch.zeros(1, 2, 16), rope.cos, rope.sin, torch.tensor([8]))
