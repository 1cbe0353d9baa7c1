"""The cluster simulator, its workloads and `caraserve simulate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from launcher.cli import main as cli_main
from services.scheduler.policies import PolicyConfig, make_policy
from services.scheduler.sim.metrics import METRIC_KEYS, summarize
from services.scheduler.sim.simulator import SimulatorConfig, simulate
from services.scheduler.sim.workload import (Workload, WorkloadConfig, WorkloadError, generate, read_popularity,
                                             read_trace)
from shared.batch_stats import BatchStats
from shared.perf_model import PerfModel

MAF = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "maf"


def _model(backend: str = "bgmv") -> PerfModel:
    lora = {"batch_max_rank": 6.0} if backend == "bgmv" else {"sum_rank": 6.0}
    return PerfModel.from_coefficients(backend, {"const": 8000.0, "requests": 150.0, "tokens": 0.4, **lora},
                                       {"const": 6000.0, "tokens": 30.0, "tokens_sq": 0.005},
                                       {"host": {"const": 4000.0, "sum_rank": 20.0}}, synthetic=True)


def _workload(n: int, seed: int, span_s: float = 1.0) -> Workload:
    rng = np.random.default_rng(seed)
    adapters = rng.integers(0, 4, size=n)
    ranks = np.array([8, 64, 16, 32])
    return Workload(np.sort(rng.uniform(0, span_s, size=n)), adapters, ranks[adapters],
                    rng.integers(5, 200, size=n), rng.integers(1, 40, size=n), ranks)


def _reference(perf: PerfModel, wl: Workload, max_batch: int, max_prefill_tokens: int):
    """One worker, simulated one engine step at a time with stats rebuilt from scratch."""
    n = len(wl)
    arrival = wl.arrival_s * 1e6
    first, finish = np.full(n, np.nan), np.full(n, np.nan)
    queue, running = [], {}  # running: request -> tokens in its context
    t, nxt = 0.0, 0
    while nxt < n or queue or running:
        while nxt < n and arrival[nxt] <= t:
            queue.append(nxt)
            nxt += 1
        if not queue and not running:
            t = arrival[nxt]
            continue
        if queue and len(running) < max_batch:
            batch = []
            while queue and len(batch) < max_batch - len(running):
                if batch and sum(wl.prompt_tokens[i] for i in batch) + wl.prompt_tokens[queue[0]] > max_prefill_tokens:
                    break
                batch.append(queue.pop(0))
            stats = BatchStats.from_requests([int(wl.rank[i]) for i in batch],
                                             [int(wl.prompt_tokens[i]) for i in batch])
            t += perf.prefill_us(stats)
            for i in batch:
                first[i] = t
                if wl.output_tokens[i] == 1:
                    finish[i] = t
                else:
                    running[i] = int(wl.prompt_tokens[i])
            continue
        ids = list(running)
        t += perf.decode_us(BatchStats.from_requests([int(wl.rank[i]) for i in ids], [running[i] for i in ids]))
        for i in ids:
            running[i] += 1
            if running[i] - wl.prompt_tokens[i] + 1 == wl.output_tokens[i]:
                finish[i] = t
                del running[i]
    return first / 1e6, finish / 1e6


@pytest.mark.parametrize("max_batch, max_prefill_tokens", [(4, 4096), (32, 150)])
def test_event_simulation_matches_a_step_by_step_reference(max_batch, max_prefill_tokens):
    perf, wl = _model(), _workload(60, seed=5, span_s=0.5)
    config = SimulatorConfig(workers=1, max_batch=max_batch, max_prefill_tokens=max_prefill_tokens)
    result = simulate(perf, wl, make_policy(PolicyConfig(policy="round_robin")), config)
    first, finish = _reference(perf, wl, max_batch, max_prefill_tokens)
    np.testing.assert_allclose(result.first_token_s, first, rtol=0, atol=1e-9)
    np.testing.assert_allclose(result.finish_s, finish, rtol=0, atol=1e-9)


def test_runs_are_deterministic_and_complete():
    perf = _model()
    config = WorkloadConfig(rate=200.0, duration=2.0, adapters=16, seed=3)
    runs = []
    for _ in range(2):
        wl = generate(config)
        policy = make_policy(PolicyConfig(policy="rank_aware"), perf, 60_000.0)
        runs.append(simulate(perf, wl, policy, SimulatorConfig(workers=4, max_batch=8)))
    a, b = runs
    assert np.array_equal(a.finish_s, b.finish_s) and np.array_equal(a.worker, b.worker)
    assert not a.rejected.any() and np.all(a.first_token_s >= a.arrival_s) and np.all(a.finish_s >= a.first_token_s)
    assert set(a.worker.tolist()) == {0, 1, 2, 3}
    other = generate(WorkloadConfig(rate=200.0, duration=2.0, adapters=16, seed=4))
    assert not np.array_equal(other.arrival_s, generate(config).arrival_s)


def test_rank_aware_beats_random_with_the_slo_penalty():
    """Mixed ranks under BGMV with a tight SLO near capacity: routing by predicted step time
    keeps requests under the SLO; scattering them (random) or counting them (least_loaded)
    pads low-rank batches to rank 64 and breaks it."""
    perf = _model("bgmv")
    wl = generate(WorkloadConfig(rate=70.0, duration=20.0, adapters=32, output_median=40, seed=1))
    sim = SimulatorConfig(workers=4, max_batch=32)
    slo_ms = 30.0
    attain = {}
    for name in ("rank_aware", "random", "least_loaded"):
        policy = make_policy(PolicyConfig(policy=name, avg_response_len=45), perf, slo_ms * 1000)
        attain[name] = summarize(simulate(perf, wl, policy, sim), slo_ms)["slo_attainment"]
    assert attain["rank_aware"] > 0.95, attain
    assert attain["rank_aware"] > attain["random"] + 0.3, attain
    assert attain["rank_aware"] > attain["least_loaded"] + 0.2, attain


def test_cold_adapters_cost_the_host_level_cold_start():
    perf = _model()
    wl = _workload(1, seed=2)
    wl.output_tokens[:] = 1
    cached = simulate(perf, wl, make_policy(PolicyConfig(policy="least_loaded")), SimulatorConfig(workers=1))
    cold = simulate(perf, wl, make_policy(PolicyConfig(policy="least_loaded")),
                    SimulatorConfig(workers=1, adapter_slots=2))
    extra = perf.cold_start_us(int(wl.rank[0]), int(wl.prompt_tokens[0]), "host") / 1e6
    assert cold.first_token_s[0] - cached.first_token_s[0] == pytest.approx(extra)


def test_traces_and_popularity_files(tmp_path):
    times = read_trace(MAF / "maf_trace_128_scale_0.4.txt")
    assert len(times) == 434 and np.all(np.diff(times) >= 0)
    assert len(read_trace(MAF / "poisson_trace_duration30_rate6.txt")) == 182
    popularity = read_popularity(MAF / "popularity_128.npy")
    assert popularity.shape == (128,) and popularity.sum() == pytest.approx(1.0)
    wl = generate(WorkloadConfig(trace=str(MAF / "maf_trace_128_scale_0.4.txt"),
                                 popularity=str(MAF / "popularity_128.npy"), ranks=(8, 64)))
    assert len(wl) == 434 and set(np.unique(wl.rank)) <= {8, 64} and wl.adapter.max() < 128
    bad = tmp_path / "bad.txt"
    bad.write_text("0.1\n0.2\n")
    with pytest.raises(WorkloadError, match="=========="):
        read_trace(bad)
    bad.write_text("header\n==========\n0.5\nsoon\n")
    with pytest.raises(WorkloadError, match="numbers"):
        read_trace(bad)
    np.save(tmp_path / "pop.npy", np.zeros((2, 2)))
    with pytest.raises(WorkloadError, match="1-D"):
        read_popularity(tmp_path / "pop.npy")


def _cli(tmp_path: Path, *extra: str) -> int:
    profile = tmp_path / "profile.json"
    if not profile.exists():
        _model().save(profile)
    return cli_main(["simulate", "--profile", str(profile), "--workers", "3", "--ranks", "8,16,32,64",
                     "--adapters", "8", "--max-batch", "8", "--seed", "2", *extra])


def test_cli_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "out.json"
    plot = tmp_path / "out.png"
    assert _cli(tmp_path, "--rate", "20", "--duration", "3", "--policy", "rank_aware,random,first_fit",
                "--json", str(out), "--plot", str(plot), "--sweep-rates", "10,30") == 0
    report = json.loads(out.read_text())
    assert isinstance(report["slo_ms"], float) and report["slo_ms"] > 0
    assert isinstance(report["requests"], int) and report["requests"] > 20
    assert list(report["policies"]) == ["rank_aware", "random", "first_fit"]
    for metrics in report["policies"].values():
        for key in METRIC_KEYS:
            assert isinstance(metrics[key], float), key
        assert 0.0 <= metrics["slo_attainment"] <= 1.0
    assert [p["rate"] for p in report["sweep"]["policies"]["random"]] == [10.0, 30.0]
    assert plot.stat().st_size > 10_000
    assert "rank_aware" in capsys.readouterr().out
    again = tmp_path / "again.json"
    _cli(tmp_path, "--rate", "20", "--duration", "3", "--policy", "rank_aware,random,first_fit",
         "--json", str(again), "--slo-ms", str(report["slo_ms"]))
    second = json.loads(again.read_text())
    assert second["policies"]["rank_aware"]["tpt_mean_ms"] == report["policies"]["rank_aware"]["tpt_mean_ms"]


@pytest.mark.parametrize("extra, message", [
    (("--rate", "5", "--duration", "2", "--ranks", "8,x"), "--ranks"),
    (("--rate", "5", "--duration", "2", "--policy", "fastest"), "unknown policies"),
    (("--duration", "2"), "either a trace or a positive rate"),
    (("--trace", "/nonexistent/trace.txt"), "cannot read trace"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, extra, message):
    assert _cli(tmp_path, "--json", str(tmp_path / "x.json"), *extra) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
