"""A heterogeneous simulated fleet: worker groups each timed and priced by their own model, the
fleet's one SLO, and `caraserve simulate --profile PATH:COUNT`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.routing.sched_sweep_hetero import RANK_TERMS, scale_rank_terms
from launcher.cli import CliError
from launcher.cli import main as cli_main
from launcher.cmd_simulate import parse_profile_spec
from services.scheduler.sim.experiment import fastest_model, resolve_slo_ms, run_policies
from services.scheduler.policies import PolicyConfig, make_policy
from services.scheduler.sim.simulator import Simulator, SimulatorConfig, WorkerGroup, simulate
from services.scheduler.sim.workload import Workload, WorkloadConfig, generate
from shared.batch_stats import BatchStats
from shared.config import ConfigError
from shared.perf_model import PerfModel

FAST = PerfModel.from_coefficients(
    "mbgmv", {"const": 8000.0, "requests": 150.0, "tokens": 0.4, "sum_rank": 6.0},
    {"const": 6000.0, "tokens": 30.0, "token_rank": 0.5, "tokens_sq": 0.005},
    {"host": {"const": 4000.0, "sum_rank": 20.0}}, model="m", model_digest="0123456789abcdef", synthetic=True)
SLOW = scale_rank_terms(FAST, 3.0)


def _isolated(n: int) -> Workload:
    """``n`` rank-64 requests, each arriving after the previous one has long finished."""
    ranks = np.array([64])
    return Workload(np.arange(n) * 100.0, np.zeros(n, dtype=np.int64), np.full(n, 64), np.full(n, 120),
                    np.full(n, 30), ranks)


def test_scaling_the_rank_terms_scales_only_the_rank_dependent_coefficients():
    for phase in ("decode", "prefill"):
        fast, slow = getattr(FAST, phase), getattr(SLOW, phase)
        for term in fast.terms:
            factor = 3.0 if term in RANK_TERMS else 1.0
            assert slow.coefficient(term) == pytest.approx(factor * fast.coefficient(term)), (phase, term)
    assert SLOW.cold_start["host"].coef == FAST.cold_start["host"].coef
    assert "rank terms x3" in SLOW.info.device_name and SLOW.info.model_digest == FAST.info.model_digest


def test_each_group_is_timed_by_its_own_model():
    wl = _isolated(4)
    result = simulate([WorkerGroup(FAST, 1), WorkerGroup(SLOW, 1)], wl,
                      make_policy(PolicyConfig(policy="round_robin")), SimulatorConfig(max_batch=8))
    assert result.worker.tolist() == [0, 1, 0, 1]
    for i, perf in enumerate((FAST, SLOW, FAST, SLOW)):
        alone = BatchStats.from_requests([64], [120])
        prefill_s = perf.prefill_us(alone) / 1e6
        decode_s = perf.decode.run_time(alone, 29) / 1e6
        assert result.first_token_s[i] - wl.arrival_s[i] == pytest.approx(prefill_s)
        assert result.finish_s[i] - result.first_token_s[i] == pytest.approx(decode_s)
    took = result.finish_s - wl.arrival_s
    assert took[1] > 1.1 * took[0] and took[3] == pytest.approx(took[1])  # the slow group's take longer


def test_views_carry_their_groups_model_and_one_group_is_the_single_profile_run():
    groups = [WorkerGroup(FAST, 2), WorkerGroup(SLOW, 3)]
    sim = Simulator(groups, _isolated(1), make_policy(PolicyConfig(policy="round_robin")), SimulatorConfig())
    assert [v.perf for v in sim.views] == [FAST, FAST, SLOW, SLOW, SLOW]
    wl = generate(WorkloadConfig(rate=60.0, duration=3.0, adapters=8, seed=1))
    policy = PolicyConfig(policy="rank_aware", avg_response_len=100)
    config = SimulatorConfig(workers=3, max_batch=8)
    bare = simulate(FAST, wl, make_policy(policy, FAST, 50_000.0), config)
    grouped = simulate([WorkerGroup(FAST, 3)], wl, make_policy(policy, None, 50_000.0), config)
    assert np.array_equal(bare.finish_s, grouped.finish_s) and np.array_equal(bare.worker, grouped.worker)
    with pytest.raises(ConfigError, match="count >= 1"):
        WorkerGroup(FAST, 0)


def test_the_fleet_has_one_slo_the_fastest_groups_and_reports_where_requests_went():
    slower_base = PerfModel.from_coefficients("mbgmv", {"const": 16000.0, "requests": 300.0, "sum_rank": 6.0},
                                              {"const": 12000.0, "tokens": 60.0}, model_digest="0123456789abcdef")
    fleet = [WorkerGroup(slower_base, 2), WorkerGroup(FAST, 2)]
    workload = WorkloadConfig(rate=30.0, duration=4.0, adapters=16, seed=2)
    sim = SimulatorConfig(max_batch=8)
    assert fastest_model(fleet, sim, workload) is FAST
    assert resolve_slo_ms(fleet, 0.0, sim, workload) == resolve_slo_ms(FAST, 0.0, sim, workload)
    assert resolve_slo_ms(fleet, 0.0, sim, workload) < resolve_slo_ms(slower_base, 0.0, sim, workload)
    assert resolve_slo_ms(fleet, 7.0, sim, workload) == 7.0
    wl = generate(workload)
    runs = run_policies(fleet, wl, ["round_robin"], sim, PolicyConfig(), 100.0)
    metrics = runs["round_robin"].metrics
    assert metrics["group0_share"] == pytest.approx(0.5, abs=0.01) and metrics["group1_share"] == pytest.approx(
        0.5, abs=0.01)
    assert 8 <= metrics["group0_mean_rank"] <= 64 and 0.0 <= metrics["group1_slo_attainment"] <= 1.0
    assert "group0_share" not in run_policies(FAST, wl, ["round_robin"], sim, PolicyConfig(), 100.0)[
        "round_robin"].metrics


@pytest.mark.parametrize("spec, expected", [
    ("a.json:16", ("a.json", 16)),
    ("a.json", ("a.json", 5)),
    ("dir:x/a.json", ("dir:x/a.json", 5)),
    ("/p/b.json:+2", ("/p/b.json", 2)),
])
def test_profile_specs_parse_as_path_and_count(spec, expected):
    assert parse_profile_spec(spec, 5) == expected


@pytest.mark.parametrize("spec", ["a.json:0", "a.json:-3"])
def test_a_count_below_one_is_refused(spec):
    with pytest.raises(CliError, match="COUNT must be >= 1"):
        parse_profile_spec(spec, 5)


def _cli(tmp_path: Path, *profiles: str) -> int:
    args = ["simulate", "--rate", "20", "--duration", "3", "--adapters", "8", "--max-batch", "8", "--workers", "1",
            "--policy", "rank_aware,least_loaded", "--json", str(tmp_path / "out.json")]
    for spec in profiles:
        args += ["--profile", spec]
    return cli_main(args)


def test_cli_simulates_a_fleet_of_profile_groups(tmp_path, capsys):
    FAST.save(tmp_path / "fast.json")
    SLOW.save(tmp_path / "slow.json")
    fast, slow = tmp_path / "fast.json", tmp_path / "slow.json"
    assert _cli(tmp_path, f"{fast}:2", f"{slow}:3", str(fast)) == 0  # the bare PATH: --workers (1) of it
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["workers"] == 6 and [g["count"] for g in report["fleet"]] == [2, 3, 1]
    assert report["fleet"][1]["device_name"].endswith("(rank terms x3)")
    assert report["profile"]["path"] == str(tmp_path / "fast.json")
    assert {"group0_share", "group1_mean_rank", "group2_slo_attainment"} <= set(report["policies"]["rank_aware"])
    assert "fleet: 2 x" in capsys.readouterr().out


def test_cli_fleet_errors_are_one_line(tmp_path, capsys):
    FAST.save(tmp_path / "fast.json")
    other = PerfModel.from_coefficients("mbgmv", {"const": 1.0}, {"const": 1.0}, model="other",
                                        model_digest="fedcba9876543210")
    other.save(tmp_path / "other.json")
    (tmp_path / "notes.json").write_text('{"hello": 1}')
    cases = [(f"{tmp_path / 'missing.json'}:2", "cannot read profile"),
             (f"{tmp_path / 'fast.json'}:0", "COUNT must be >= 1"),
             (f"{tmp_path / 'notes.json'}:2", "not a caraserve.profile/1 profile"),
             (f"{tmp_path / 'other.json'}:2", "a fleet serves one model")]
    for spec, message in cases:
        assert _cli(tmp_path, f"{tmp_path / 'fast.json'}:1", spec) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
