"""The grouping bound: what rank-homogeneous batches can add at most."""

from __future__ import annotations

import pytest

from services.scheduler.sim.grouping_bound import expected_max_rank, grouping_bound
from shared.perf_model import PerfModel


def test_expected_max_rank():
    assert expected_max_rank([16], 32) == 16
    assert expected_max_rank([8, 64], 2) == pytest.approx(0.25 * 8 + 0.75 * 64)
    assert expected_max_rank([8, 16, 32, 64], 32) == pytest.approx(64, abs=0.01)


def test_bgmv_bound_follows_the_padding():
    model = PerfModel.from_coefficients("bgmv", {"const": 1000.0, "batch_max_rank": 10.0}, {"const": 500.0})
    g = grouping_bound(model, (8, 64), max_batch=2, prompt_tokens=0, output_tokens=3)
    # mixed: 1000 + 10 * 2 * E[max] (50) = 2000 a step, one step a request, plus a 500 prefill
    assert g.step_mixed_us == pytest.approx(2000)
    assert g.step_grouped_us == pytest.approx({8: 1160, 64: 2280})
    assert g.work_mixed_us == pytest.approx(2500)
    assert g.work_grouped_us == pytest.approx((1160 + 2280) / 2 + 500)
    assert g.bound == pytest.approx(2500 / 2220)
    assert g.capacity_rps(4) == pytest.approx((4e6 / 2500, 4e6 / 2220))


def test_mbgmv_grouping_cannot_help():
    model = PerfModel.from_coefficients("mbgmv", {"const": 1000.0, "sum_rank": 10.0, "tokens": 0.5, "adapters": 30.0},
                                        {"const": 500.0, "tokens": 2.0, "token_rank": 0.1})
    g = grouping_bound(model, (8, 16, 32, 64), max_batch=32, prompt_tokens=100, output_tokens=50)
    assert g.step_grouped_us[64] > g.step_mixed_us > g.step_grouped_us[8]
    assert g.bound == pytest.approx(1.0)


def test_bad_arguments():
    model = PerfModel.from_coefficients("bgmv", {"const": 1.0}, {"const": 1.0})
    with pytest.raises(ValueError):
        grouping_bound(model, (), 32, 10, 10)
    with pytest.raises(ValueError):
        grouping_bound(model, (8,), 32, 10, 0)
