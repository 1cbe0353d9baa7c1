"""Triton shrink/expand kernels (triton_lora.py) on CPU tensors in Triton's interpreter, against lora_reference.

Triton reads TRITON_INTERPRET when ``triton`` itself is imported (its standard-library kernels,
e.g. ``tl.zeros``, are decorated then) and when a kernel is decorated. So the kernel cases below
run in a child pytest started with TRITON_INTERPRET=1, which leaves the rest of the suite alone;
in the parent run they are skipped and :func:`test_kernels_under_interpreter` reports the child.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from services.gpu_worker.lora_ops import lora_reference, token_adapters
from tests.unit.gpu_worker.triton_compile import compile_for_hopper

pytest.importorskip("triton", reason="triton is not installed, so the Triton LoRA kernels cannot be tested")

ROOT = Path(__file__).resolve().parents[3]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
PARENT_ONLY = "not under_interpreter and not compile_for_hopper"
"""Deselects the tests that run in the parent only, so the child reports kernel cases alone."""
kernel_case = pytest.mark.skipif(not INTERPRETED,
                                 reason="run by test_kernels_under_interpreter with TRITON_INTERPRET=1")

FAN_IN, FAN_OUT = 80, 72  # two K blocks and two N blocks, both partial
RANKS = [1, 8, 0, 16, 64]  # rank 1, mixed ranks, and an adapter without weights on this projection
SEGMENTS = [(2, 5, 0), (5, 25, 1), (25, 27, 2), (30, 31, 3), (31, 37, 4)]  # gaps: 0-1, 27-29, 37-39
TOKENS = 40
SEGS = torch.tensor(SEGMENTS, dtype=torch.int64)
MAX_RANK = max(RANKS)
UNTOUCHED = [t for t, u in enumerate(token_adapters(SEGS, TOKENS)) if u < 0 or RANKS[u] == 0]


@pytest.mark.skipif(INTERPRETED, reason="this is the child run")
def test_kernels_under_interpreter():
    """Every kernel case below passes in a child run, none skipped."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", "-k", PARENT_ONLY]
    child = subprocess.run([*command, __file__], capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-2000:]
    assert " passed" in child.stdout and "skipped" not in child.stdout, child.stdout[-2000:]


@pytest.mark.skipif(INTERPRETED, reason="the interpreter compiles nothing")
@pytest.mark.parametrize("dtype,precision", [("fp32", "ieee"), ("bf16", "tf32")])
@pytest.mark.parametrize("padded", [True, False], ids=["bgmv", "mbgmv"])
def test_kernels_compile_for_hopper(dtype, precision, padded, tmp_path, monkeypatch):
    """The interpreter runs the kernels as Python; this also lowers them to sm_90 code (bundled ptxas, no GPU)."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated to silence its warning
    from services.gpu_worker import triton_lora

    tables = {"segs_ptr": "*i64", "adapters_ptr": "*i64", "v_ptr": "*fp32"}
    mode = {"PADDED": padded, "PRECISION": precision, "BLOCK_T": triton_lora.BLOCK_T, "BLOCK_R": triton_lora.BLOCK_R}
    assert compile_for_hopper(triton_lora._shrink_kernel, {**tables, "x_ptr": f"*{dtype}"},
                              {**mode, "BLOCK_K": triton_lora.BLOCK_K})
    assert compile_for_hopper(triton_lora._expand_kernel, {**tables, "y_ptr": f"*{dtype}"},
                              {**mode, "BLOCK_N": triton_lora.BLOCK_N})


@pytest.fixture(scope="module")
def triton_lora() -> ModuleType:
    from services.gpu_worker import triton_lora

    return triton_lora


def make_weights(dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    empty = torch.empty(0, 0, dtype=dtype)
    A = [torch.randn(FAN_IN, r, generator=g).to(dtype) if r else empty for r in RANKS]
    B = [(torch.randn(r, FAN_OUT, generator=g) * 0.1).to(dtype) if r else empty for r in RANKS]
    return A, B


def activations(dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(TOKENS, FAN_IN, generator=g).to(dtype), torch.randn(TOKENS, FAN_OUT, generator=g).to(dtype)


# bf16: one rounding of the sum (the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest).
@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float32, 1e-4, 1e-5), (torch.bfloat16, 3e-2, 1e-2)])
@pytest.mark.parametrize("pad_rank", [MAX_RANK, 0], ids=["bgmv", "mbgmv"])
@kernel_case
def test_matches_reference(triton_lora, dtype, atol, rtol, pad_rank):
    A, B = make_weights(dtype)
    x, base = activations(dtype)
    y = base.clone()
    triton_lora.lora_segments_(y, x, SEGS, A, B, pad_rank)
    want = base.float() + lora_reference(x, token_adapters(SEGS, TOKENS), A, B, pad_rank=pad_rank)
    torch.testing.assert_close(y.float(), want, atol=atol, rtol=rtol)
    assert torch.equal(y[UNTOUCHED], base[UNTOUCHED]), "tokens without an adapter must be left alone"


@kernel_case
def test_padded_and_per_rank_modes_agree(triton_lora):
    A, B = make_weights(torch.float32, seed=2)
    x, base = activations(torch.float32, seed=3)
    padded, per_rank = base.clone(), base.clone()
    triton_lora.lora_segments_(padded, x, SEGS, A, B, MAX_RANK)
    triton_lora.lora_segments_(per_rank, x, SEGS, A, B, 0)
    torch.testing.assert_close(padded, per_rank, atol=1e-5, rtol=1e-5)


@kernel_case
def test_shrink_pads_only_in_bgmv_mode(triton_lora):
    """Padded shrink writes zeros up to R; per-rank shrink stops at each segment's own rank."""
    A, B = make_weights(torch.float32)
    x, _ = activations(torch.float32)
    segs, adapters = triton_lora.device_tables(SEGS, A, B, x.device)
    for padded in (True, False):
        v = torch.full((TOKENS, MAX_RANK), float("nan"))
        triton_lora.shrink(v, x, segs, adapters, max_tokens=max(e - s for s, e, _ in SEGMENTS), padded=padded)
        for start, end, u in SEGMENTS:
            r = RANKS[u]
            if r:
                torch.testing.assert_close(v[start:end, :r], x[start:end] @ A[u], atol=1e-4, rtol=1e-5)
            beyond = v[start:end, r:]
            if padded and r:
                assert torch.equal(beyond, torch.zeros_like(beyond)), "BGMV computes every rank column up to R"
            else:
                assert beyond.isnan().all(), "MBGMV stops at the segment's rank; rank 0 is skipped"
        assert v[UNTOUCHED].isnan().all()


@kernel_case
def test_strided_output_slice_is_written_only_where_segments_are(triton_lora):
    """y is a column slice of a fused output, as q/k/v land in one qkv projection (x is strided too).

    The fused output starts as -0.0: a kernel that read-modify-writes an element it does not
    own (even adding zero) turns it into +0.0, so the sign bit shows every stray write.
    """
    A, B = make_weights(torch.float32)
    x = torch.cat([torch.randn(TOKENS, 4), activations(torch.float32)[0]], dim=1)[:, 4:]  # a strided input too
    fused = torch.full((TOKENS, FAN_OUT + 24), -0.0)
    view = fused[:, 8:8 + FAN_OUT]
    triton_lora.lora_segments_(view, x, SEGS, A, B, 0)
    torch.testing.assert_close(view, lora_reference(x, token_adapters(SEGS, TOKENS), A, B), atol=1e-4, rtol=1e-5)
    assert fused[:, :8].signbit().all() and fused[:, 8 + FAN_OUT:].signbit().all(), "columns outside the slice written"
    assert view[UNTOUCHED].signbit().all(), "tokens without an adapter written"


@kernel_case
def test_weight_dtype_must_match_activations(triton_lora):
    A, B = make_weights(torch.bfloat16)
    x, base = activations(torch.float32)
    with pytest.raises(ValueError, match="does not match"):
        triton_lora.lora_segments_(base, x, SEGS, A, B, 0)
