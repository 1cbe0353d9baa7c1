"""Smoke test of the engine benchmark's core on the tiny model (shape and consistency, not speed)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.engine import run_benchmark, write_outputs
from bench.engine_options import RunOptions
from bench.engine_metrics import decode_step_flops, linear_flops_per_token, percentile, summarize
from bench.engine_workload import EngineWorkload, make_requests
from shared.config import ConfigError
from shared.llama_shape import LlamaShape

STATS = ("p50", "p90", "p99", "mean")


def _workload(tiny_adapters) -> tuple[EngineWorkload, dict]:
    """6 short requests over the tiny fixture's adapters (renamed to the workload's names)."""
    workload = EngineWorkload(num_requests=6, prompt_min=4, prompt_max=12, output_min=2, output_max=5,
                              num_adapters=4, hf_batch_size=4, seed=3)
    fixtures = [tiny_adapters[n] for n in ("qv_r8", "all7_r16", "alllinear_r32", "regex_r64")]
    return workload, dict(zip(workload.adapter_ranks(), fixtures))


@pytest.fixture(scope="module", autouse=True)
def keep_torch_threads():
    """The in-process runs set torch's thread count (1 here); give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def report(tiny_model_dir, tiny_adapters):
    workload, adapters = _workload(tiny_adapters)
    return run_benchmark(tiny_model_dir, adapters, workload,
                         RunOptions(isolate=False, peak_size=256, repeats=2, threads=1))


def test_report_has_every_run_with_sane_numbers(report, tiny_model_dir):
    assert set(report["runs"]) == {"a", "b", "c", "d", "e"}
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    wanted = sum(r.max_tokens for r in make_requests(EngineWorkload(**report["workload"]), vocab))
    for key, run in report["runs"].items():
        assert run["useful_tokens"] == wanted, key
        assert run["wall_s"] > 0 and run["peak_rss_bytes"] > 0
        assert run["tokens_per_s"] == pytest.approx(run["useful_tokens"] / run["wall_s"])
        for metric in ("ttft_s", "tpot_s"):
            stats = run[metric]
            assert set(stats) == set(STATS), (key, metric)
            assert 0 <= stats["p50"] <= stats["p90"] <= stats["p99"], (key, metric)
        assert run["ttft_s"]["p99"] <= run["wall_s"]
        assert run["cpu_s"] > 0 and run["tokens_per_cpu_s"] > 0
        assert len(run["rounds"]) == 2
        assert run["tokens_per_s"] == max(r["tokens_per_s"] for r in run["rounds"])


def test_report_targets_and_decode_efficiency(report):
    runs, targets = report["runs"], report["targets"]
    a_vs_d = targets["a_vs_d"]
    assert a_vs_d["ratio"] == pytest.approx(runs["a"]["tokens_per_s"] / runs["d"]["tokens_per_s"])
    assert a_vs_d["pass"] == (a_vs_d["ratio"] >= 5.0)
    best = max(runs["a"]["tokens_per_s"], runs["b"]["tokens_per_s"])
    assert targets["best_lora_vs_base"]["ratio"] == pytest.approx(best / runs["c"]["tokens_per_s"])
    assert targets["peak_rss"]["max_bytes"] == max(runs[k]["peak_rss_bytes"] for k in "abc")
    eff = report["decode_efficiency"]
    assert eff["steps"] > 0 and eff["time_s"] > 0 and eff["flops"] > 0
    assert eff["tokens"] >= eff["steps"]
    assert 0 < eff["fraction_of_best_peak"] <= eff["fraction_of_median_peak"]
    json.dumps(report)  # plain JSON all the way down


def test_write_outputs(report, tmp_path):
    png = write_outputs(report, tmp_path / "engine-cpu.json")
    assert json.loads((tmp_path / "engine-cpu.json").read_text())["runs"].keys() == report["runs"].keys()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_skipped_baselines_leave_target_undecided(tiny_model_dir, tiny_adapters):
    workload, adapters = _workload(tiny_adapters)
    small = EngineWorkload(**{**workload.to_dict(), "num_requests": 2})
    options = RunOptions(configs=("a", "c"), isolate=False, peak_size=256, threads=1)
    out = run_benchmark(tiny_model_dir, adapters, small, options)
    assert out["targets"]["a_vs_d"]["pass"] is None
    assert out["targets"]["best_lora_vs_base"]["pass"] is not None


def test_decode_flops_count():
    shape = LlamaShape(num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1, head_dim=4)
    linear = 2 * (2 * (8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16) + 10 * 8)
    assert linear_flops_per_token(shape, 10) == linear
    lora = 2 * 4 * 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24)
    assert decode_step_flops(shape, 10, [5], [4]) == linear + lora + 4 * 5 * 8 * 2
    assert decode_step_flops(shape, 10, [5, 5], [0, 0]) == 2 * (linear + 4 * 5 * 8 * 2)


def test_percentiles():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)
    assert summarize([1.0, 2.0, 3.0, 4.0])["mean"] == 2.5
    with pytest.raises(ValueError):
        percentile([], 50)


def test_workload_is_seeded_and_validated():
    w = EngineWorkload(num_requests=5, seed=9)
    assert make_requests(w, 1000) == make_requests(w, 1000)
    assert make_requests(w, 1000) != make_requests(EngineWorkload(num_requests=5, seed=10), 1000)
    assert list(w.adapter_ranks().values())[:5] == [8, 16, 32, 64, 8]
    with pytest.raises(ConfigError):
        EngineWorkload(output_min=1)
