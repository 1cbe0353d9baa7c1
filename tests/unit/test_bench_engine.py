"""Smoke test of the engine benchmark's core on the tiny model (shape and consistency, not speed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from bench.engine.benchmark import main, parse_args, _options, run_benchmark, write_outputs
from bench.engine.configs import make_spec
from bench.engine.options import RunOptions
from bench.engine.metrics import (decode_step_bytes, decode_step_flops, last_level_cache_bytes, linear_flops_per_token,
                                  memory_bandwidth, percentile, summarize)
from bench.engine.plot import target_notes
from bench.engine.report import ratios, targets
from bench.engine.vllm_peer import vllm_unavailable
from bench.engine.vllm_runner import max_lora_rank
from bench.engine.workload import EngineWorkload, make_requests
from shared.config import ConfigError
from shared.llama_shape import LlamaShape

STATS = ("p50", "p90", "p99", "mean")
NO_VLLM = "/nonexistent/.venv-vllm/bin/python"


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
    options = RunOptions(configs=("a", "b", "c", "d", "e"), isolate=False, peak_size=256, bandwidth_bytes=1 << 20,
                         repeats=2, threads=1)
    return run_benchmark(tiny_model_dir, adapters, workload, options)


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
    runs, found = report["runs"], report["targets"]
    best = max(runs["a"]["tokens_per_s"], runs["b"]["tokens_per_s"])
    vs_peft = found["best_lora_vs_peft"]
    assert vs_peft["ratio"] == pytest.approx(best / runs["d"]["tokens_per_s"])
    assert vs_peft["pass"] == (vs_peft["ratio"] >= 10.0)
    assert found["base_vs_vllm_base"]["pass"] is None  # (g) did not run
    assert found["peak_rss"]["value"] == max(runs[k]["peak_rss_bytes"] for k in "abc")
    assert set(found["cpu_use"]["per_config"]) == {"a", "b", "c"}
    assert report["skipped"] == {}
    eff = report["decode_efficiency"]
    assert eff["steps"] > 0 and eff["time_s"] > 0 and eff["flops"] > 0 and eff["bytes_read"] > 0
    assert eff["tokens"] >= eff["steps"]
    assert 0 < eff["fraction_of_best_peak"] <= eff["fraction_of_median_peak"]
    assert 0 < eff["fraction_of_best_bandwidth"] <= eff["fraction_of_median_bandwidth"]
    assert found["decode_efficiency"]["value"] == {"of_peak": eff["fraction_of_best_peak"],
                                                   "of_bandwidth": eff["fraction_of_best_bandwidth"]}
    json.dumps(report)  # plain JSON all the way down


def test_write_outputs(report, tmp_path):
    png = write_outputs(report, tmp_path / "engine-cpu.json")
    assert json.loads((tmp_path / "engine-cpu.json").read_text())["runs"].keys() == report["runs"].keys()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_skipped_baselines_leave_target_undecided(tiny_model_dir, tiny_adapters):
    workload, adapters = _workload(tiny_adapters)
    small = EngineWorkload(**{**workload.to_dict(), "num_requests": 2})
    options = RunOptions(configs=("a", "c"), isolate=False, peak_size=256, bandwidth_bytes=1 << 20, threads=1)
    out = run_benchmark(tiny_model_dir, adapters, small, options)
    assert out["targets"]["best_lora_vs_peft"]["pass"] is None
    assert out["targets"]["cpu_use"]["pass"] is not None
    assert out["targets"]["decode_efficiency"]["pass"] is not None


def test_missing_vllm_is_skipped_with_reason(tiny_model_dir, tiny_adapters, capsys):
    workload, adapters = _workload(tiny_adapters)
    small = EngineWorkload(**{**workload.to_dict(), "num_requests": 2})
    options = RunOptions(configs=("c", "f", "g"), isolate=False, threads=1, vllm_python=NO_VLLM)
    out = run_benchmark(tiny_model_dir, adapters, small, options)
    assert set(out["runs"]) == {"c"}
    assert set(out["skipped"]) == {"f", "g"}
    assert out["skipped"]["g"].startswith("vLLM CPU backend not installed: run `make bench`")
    assert NO_VLLM in out["skipped"]["f"]
    assert out["targets"]["base_vs_vllm_base"]["pass"] is None
    assert "vLLM CPU backend not installed" in capsys.readouterr().err


def test_vllm_that_does_not_import_gives_the_error():
    reason = vllm_unavailable(Path(sys.executable))  # the project's venv has no vllm
    assert "does not import" in reason and "ModuleNotFoundError" in reason


def test_vllm_max_lora_rank_holds_every_adapter(tmp_path):
    def adapter(name: str, rank: int) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(json.dumps({"r": rank}))
        return tmp_path / name

    assert max_lora_rank({"a": adapter("a", 8), "b": adapter("b", 64)}) == 64
    assert max_lora_rank({"c": adapter("c", 48)}) == 64
    assert max_lora_rank({"d": adapter("d", 1)}) == 1
    with pytest.raises(ValueError):
        max_lora_rank({"e": adapter("e", 1024)})


def _run(system: str, tokens_per_s: float, cpu_s: float = 2.0, rss: int = 1 << 30) -> dict:
    return {"system": system, "tokens_per_s": tokens_per_s, "wall_s": 1.0, "cpu_s": cpu_s, "peak_rss_bytes": rss}


SEVEN = {"a": _run("engine", 300.0), "b": _run("engine", 320.0), "c": _run("engine", 400.0, cpu_s=1.9),
         "d": _run("hf", 20.0), "e": _run("hf", 70.0), "f": _run("vllm", 14.0), "g": _run("vllm", 380.0)}


def test_targets_against_the_vllm_peer():
    efficiency = {"fraction_of_best_peak": 0.2, "fraction_of_best_bandwidth": 0.65}
    found = targets(SEVEN, efficiency)
    assert found["base_vs_vllm_base"]["ratio"] == pytest.approx(400 / 380) and found["base_vs_vllm_base"]["pass"]
    assert found["best_lora_vs_vllm_base"]["ratio"] == pytest.approx(320 / 380)
    assert found["best_lora_vs_vllm_base"]["pass"]
    assert found["best_lora_vs_peft"]["ratio"] == pytest.approx(16.0) and found["best_lora_vs_peft"]["pass"]
    assert found["cpu_use"]["value"] == pytest.approx(1.9) and found["cpu_use"]["pass"]
    assert found["peak_rss"]["pass"]
    assert found["decode_efficiency"]["pass"]  # the bandwidth fraction suffices
    slow = {**SEVEN, "c": _run("engine", 300.0, cpu_s=1.2, rss=3 << 30)}
    found = targets(slow, {"fraction_of_best_peak": 0.3, "fraction_of_best_bandwidth": 0.5})
    assert not found["base_vs_vllm_base"]["pass"]
    assert not found["cpu_use"]["pass"] and found["cpu_use"]["per_config"]["c"] == pytest.approx(1.2)
    assert not found["peak_rss"]["pass"]
    assert not found["decode_efficiency"]["pass"]
    assert targets(SEVEN)["decode_efficiency"]["pass"] is None
    assert len(target_notes(found)) == len(found)


def test_ratios_cover_every_configuration_against_each_reference():
    out = ratios(SEVEN)
    assert out["c/g"] == pytest.approx(400 / 380) and out["g/c"] == pytest.approx(380 / 400)
    assert out["b/f"] == pytest.approx(320 / 14) and out["a/d"] == pytest.approx(15.0)
    assert {k.split("/")[0] for k in out} == set(SEVEN)
    assert {k.split("/")[1] for k in out} == {"c", "d", "e", "f", "g"}
    assert "a/b" not in out and "g/g" not in out
    assert set(ratios({k: SEVEN[k] for k in "ac"})) == {"a/c"}


def test_plot_shows_all_seven_configurations(report, tmp_path):
    runs = {**report["runs"], "f": {**report["runs"]["b"], "system": "vllm", "label": "vLLM CPU, mixed adapters"},
            "g": {**report["runs"]["c"], "system": "vllm", "label": "vLLM CPU, base model only"}}
    full = {**report, "runs": runs, "targets": targets(runs, report["decode_efficiency"])}
    png = write_outputs(full, tmp_path / "engine-cpu.json")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(json.loads((tmp_path / "engine-cpu.json").read_text())["runs"]) == list("abcdefg")


def test_cli_selects_configurations():
    assert _options(parse_args(["--configs", "f,g"])).configs == ("f", "g")
    assert _options(parse_args(["--skip-vllm", "--skip-hf"])).configs == ("a", "b", "c")
    assert _options(parse_args([])).configs == tuple("abcdefg")
    assert main(["--configs", "x"]) == 1
    assert main(["--configs", "fg", "--skip-vllm"]) == 1


def test_decode_flops_count():
    shape = LlamaShape(num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1, head_dim=4)
    linear = 2 * (2 * (8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16) + 10 * 8)
    assert linear_flops_per_token(shape, 10) == linear
    lora = 2 * 4 * 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24)
    assert decode_step_flops(shape, 10, [5], [4]) == linear + lora + 4 * 5 * 8 * 2
    assert decode_step_flops(shape, 10, [5, 5], [0, 0]) == 2 * (linear + 4 * 5 * 8 * 2)


def test_decode_bytes_count():
    shape = LlamaShape(num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1, head_dim=4)
    weights = 2 * (2 * (8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16) + 10 * 8)
    kv = 2 * 5 * 1 * 4 * 2 * 2  # k and v, ctx 5, 1 KV head of 4, 2 layers, bf16
    lora = 2 * 4 * 2 * (16 + 12 + 12 + 16 + 24 + 24 + 24)  # rank 4, bf16, read once however many use it
    assert decode_step_bytes(shape, 10, [5], []) == weights + kv
    assert decode_step_bytes(shape, 10, [5, 5], [4]) == weights + 2 * kv + lora


def test_memory_bandwidth_is_measured():
    out = memory_bandwidth("cpu", 1 << 20, repeats=2)
    assert out["size_bytes"] == 1 << 20 and out["kind"] in ("copy", "sum")
    assert 0 < out["median_bytes_per_s"] <= out["best_bytes_per_s"] == out[f"{out['kind']}_best_bytes_per_s"]


def test_last_level_cache_is_read_from_sysfs():
    llc = last_level_cache_bytes()
    assert llc >= 0
    if llc:  # a Linux host that reports its caches: a real size, not a count of kilobytes
        assert 64 * 1024 <= llc <= 16 * 1024 ** 3


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
    with pytest.raises(ConfigError):
        EngineWorkload(step_tokens=8)


def test_both_engines_get_the_workloads_step_budget(tiny_model_dir):
    # our engine's max_batched_tokens and vLLM's max_num_batched_tokens come from the same spec field
    spec = make_spec("c", tiny_model_dir, {}, [], "cpu", 2, 4, step_tokens=1234)
    assert spec["step_tokens"] == 1234
    assert EngineWorkload().step_tokens == 4096
