"""The heterogeneous-fleet scheduling sweep on a small synthetic profile: its report and plot."""

from __future__ import annotations

import json

import pytest

from bench.routing import sched_sweep_hetero
from shared.perf_model import PerfModel

PROFILE = PerfModel.from_coefficients(
    "mbgmv", {"const": 8000.0, "requests": 150.0, "sum_rank": 20.0, "adapters": 300.0},
    {"const": 6000.0, "tokens": 30.0, "token_rank": 1.0}, model_digest="0123456789abcdef", synthetic=True)


def test_the_sweep_reports_highest_loads_ratios_and_the_groups(tmp_path, capsys):
    PROFILE.save(tmp_path / "a.json")
    out = tmp_path / "hetero.json"
    assert sched_sweep_hetero.main(["--profile", str(tmp_path / "a.json"), "--workers-per-group", "2",
                                    "--duration", "20", "--rates", "5,20,60", "--policy",
                                    "rank_aware,least_loaded,random", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["synthetic"] and report["rank_factor"] == 3.0 and report["popularity"] == "popularity_512.npy"
    assert [g["count"] for g in report["groups"]] == [2, 2] and "multiplied by 3" in report["groups"][1]["derivation"]
    assert set(report["highest_rate_at_99"]) == {"rank_aware", "least_loaded", "random"}
    assert set(report["rank_aware_ratio"]) == {"least_loaded", "random"}
    for points in report["policies"].values():
        assert [p["rate"] for p in points] == [5.0, 20.0, 60.0]
        assert all(p["group0_share"] + p["group1_share"] == pytest.approx(1.0) for p in points)
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert json.loads(capsys.readouterr().out)["rank_aware_ratio"] == report["rank_aware_ratio"]


def test_a_synthetic_profile_is_not_written_under_bench_results(tmp_path):
    PROFILE.save(tmp_path / "a.json")
    with pytest.raises(SystemExit, match="synthetic"):
        sched_sweep_hetero.main(["--profile", str(tmp_path / "a.json"), "--rates", "5", "--workers-per-group", "1",
                                 "--duration", "2", "--out", str(sched_sweep_hetero.RESULTS / "x.json")])
    assert not (sched_sweep_hetero.RESULTS / "x.json").exists()
