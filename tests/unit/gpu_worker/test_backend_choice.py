"""Backend auto's rule: the family whose profile predicts the lower cost per output token for the served ranks."""

from __future__ import annotations

import pytest

from services.gpu_worker.profiling.backend_choice import cost_per_token_us, faster_backend
from shared.perf_model import PerfModel


def model(backend: str, rank_term: str, per_rank: float) -> PerfModel:
    return PerfModel.from_coefficients(backend, decode={"const": 10_000.0, "requests": 500.0, rank_term: per_rank},
                                       prefill={"const": 20_000.0, "tokens": 300.0})


def test_padding_makes_bgmv_dearer_for_mixed_ranks_and_the_tie_keeps_mbgmv():
    bgmv = model("bgmv", "batch_max_rank", 10.0)  # pads every request to the batch's max rank
    mbgmv = model("mbgmv", "sum_rank", 10.0)  # pays each request's own rank
    chosen, costs = faster_backend({"bgmv": bgmv, "mbgmv": mbgmv}, [8, 64])
    assert chosen == "mbgmv" and costs["bgmv"] > costs["mbgmv"]
    one_rank, tied = faster_backend({"bgmv": bgmv, "mbgmv": mbgmv}, [64])  # one rank: nothing to pad, a tie
    assert one_rank == "mbgmv" and tied["bgmv"] == pytest.approx(tied["mbgmv"]) == cost_per_token_us(bgmv, [64])
    assert faster_backend({"bgmv": bgmv, "mbgmv": mbgmv}, [])[0] == "mbgmv"  # no adapters: a tie


def test_a_cheaper_bgmv_kernel_wins():
    bgmv = model("bgmv", "batch_max_rank", 1.0)
    mbgmv = model("mbgmv", "sum_rank", 30.0)
    assert faster_backend({"bgmv": bgmv, "mbgmv": mbgmv}, [8, 16, 64])[0] == "bgmv"


def test_no_adapters_keeps_the_start_backend_whatever_the_fits_say():
    # with no adapters both families run the base path; a fit that happens to be cheaper must not switch
    bgmv = PerfModel.from_coefficients("bgmv", decode={"const": 9_000.0, "requests": 400.0},
                                       prefill={"const": 20_000.0, "tokens": 300.0})
    mbgmv = model("mbgmv", "sum_rank", 10.0)
    chosen, costs = faster_backend({"bgmv": bgmv, "mbgmv": mbgmv}, [])
    assert chosen == "mbgmv" and costs["bgmv"] < costs["mbgmv"]
