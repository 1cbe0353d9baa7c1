"""The engine benchmark's verdicts: throughput ratios, the issue's targets and the decode-step efficiency.

Every target is ``{"name", "ratio" or "value", "target", "pass"}``; ``pass`` is None when a
configuration it needs did not run (skipped, or vLLM not installed).
"""

from __future__ import annotations

GIB = 1024 ** 3
BASE_VS_VLLM = 1.0  # (c) >= 1.0x (g)
LORA_VS_VLLM_BASE = 0.8  # max((a), (b)) >= 0.8x (g)
LORA_VS_PEFT = 10.0  # max((a), (b)) >= 10x (d)
CPU_USE_CORES = 1.8  # every engine configuration: cpu_s / wall_s during generation
RSS_LIMIT_BYTES = 2 * GIB  # every engine configuration
PEAK_FRACTION = 0.35  # decode steps: of the bf16 matmul peak ...
BANDWIDTH_FRACTION = 0.6  # ... or of the memory bandwidth
ENGINE_CONFIGS = ("a", "b", "c")
LORA_CONFIGS = ("a", "b")
DENOMINATORS = ("c", "d", "e", "f", "g")  # the base engine, the transformers baselines and the vLLM peer
REFERENCE_TOKENS_PER_S = {"d": 22.0, "e": 66.0}  # what the issue measured on the 2-core dev box


def _ratio(name: str, numerator: float | None, denominator: float | None, target: float) -> dict:
    if numerator is None or denominator is None:
        return {"name": name, "ratio": None, "target": target, "pass": None}
    ratio = numerator / denominator
    return {"name": name, "ratio": ratio, "target": target, "pass": ratio >= target}


def _tps(runs: dict, key: str) -> float | None:
    return runs[key]["tokens_per_s"] if key in runs else None


def _best_lora(runs: dict) -> float | None:
    lora = [t for t in (_tps(runs, k) for k in LORA_CONFIGS) if t is not None]
    return max(lora) if lora else None


def _engine_runs(runs: dict) -> dict:
    return {k: r for k, r in runs.items() if r["system"] == "engine"}


def cpu_use(run: dict) -> float:
    """Cores busy on average during generation: CPU seconds over wall seconds."""
    return run["cpu_s"] / run["wall_s"]


def _cpu_use_target(runs: dict) -> dict:
    per_config = {k: cpu_use(r) for k, r in _engine_runs(runs).items()}
    value = min(per_config.values()) if per_config else None
    return {"name": "engine CPU use (min over engine configs, cpu_s / wall_s)", "value": value,
            "per_config": per_config, "target": CPU_USE_CORES,
            "pass": value >= CPU_USE_CORES if value is not None else None}


def _rss_target(runs: dict) -> dict:
    engine_rss = [r["peak_rss_bytes"] for r in _engine_runs(runs).values()]
    rss = max(engine_rss) if engine_rss else None
    return {"name": "engine peak RSS (max over engine configs, bytes)", "value": rss,
            "max_gib": rss / GIB if rss is not None else None, "target": RSS_LIMIT_BYTES,
            "pass": rss <= RSS_LIMIT_BYTES if rss is not None else None}


def _decode_target(efficiency: dict | None) -> dict:
    peak = efficiency["fraction_of_best_peak"] if efficiency else None
    bandwidth = efficiency["fraction_of_best_bandwidth"] if efficiency else None
    return {"name": "decode steps: fraction of bf16 matmul peak, or of memory bandwidth",
            "value": {"of_peak": peak, "of_bandwidth": bandwidth},
            "target": {"of_peak": PEAK_FRACTION, "of_bandwidth": BANDWIDTH_FRACTION},
            "pass": (peak >= PEAK_FRACTION or bandwidth >= BANDWIDTH_FRACTION) if efficiency else None}


def targets(runs: dict, efficiency: dict | None = None) -> dict:
    """Pass/fail of each of the issue's targets (``efficiency``: :func:`decode_efficiency` of the report)."""
    best_lora = _best_lora(runs)
    return {
        "base_vs_vllm_base": _ratio("(c)/(g)", _tps(runs, "c"), _tps(runs, "g"), BASE_VS_VLLM),
        "best_lora_vs_vllm_base": _ratio("max((a),(b))/(g)", best_lora, _tps(runs, "g"), LORA_VS_VLLM_BASE),
        "best_lora_vs_peft": _ratio("max((a),(b))/(d)", best_lora, _tps(runs, "d"), LORA_VS_PEFT),
        "cpu_use": _cpu_use_target(runs),
        "peak_rss": _rss_target(runs),
        "decode_efficiency": _decode_target(efficiency),
    }


def decode_efficiency(run: dict | None) -> dict | None:
    """The run's decode-only steps as fractions of the bf16 matmul peak and of the memory bandwidth."""
    if run is None or "decode" not in run or "matmul_peak" not in run or "memory_bandwidth" not in run:
        return None
    decode, peak, bandwidth = run["decode"], run["matmul_peak"], run["memory_bandwidth"]
    return {"config": run["config"], **decode, "matmul_peak": peak, "memory_bandwidth": bandwidth,
            "fraction_of_best_peak": decode["flops_per_s"] / peak["best_flops_per_s"],
            "fraction_of_median_peak": decode["flops_per_s"] / peak["median_flops_per_s"],
            "fraction_of_best_bandwidth": decode["bytes_per_s"] / bandwidth["best_bytes_per_s"],
            "fraction_of_median_bandwidth": decode["bytes_per_s"] / bandwidth["median_bytes_per_s"]}


def ratios(runs: dict) -> dict:
    """Every configuration's throughput relative to each of the base engine, the baselines and the peer that ran."""
    return {f"{num}/{den}": runs[num]["tokens_per_s"] / runs[den]["tokens_per_s"]
            for num in runs for den in DENOMINATORS if num != den and den in runs}
