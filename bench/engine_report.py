"""The engine benchmark's verdicts: target ratios, the RSS limit and the decode-step efficiency."""

from __future__ import annotations

GIB = 1024 ** 3
ENGINE_VS_PEFT = 5.0  # (a) >= 5x (d)
LORA_VS_BASE = 0.8  # max((a), (b)) >= 0.8x (c)
RSS_LIMIT_BYTES = 2 * GIB  # every engine configuration
REFERENCE_TOKENS_PER_S = {"d": 22.0, "e": 66.0}  # what the issue measured on the 2-core dev box


def _ratio(name: str, numerator: float | None, denominator: float | None, target: float) -> dict:
    if numerator is None or denominator is None:
        return {"name": name, "ratio": None, "target": target, "pass": None}
    ratio = numerator / denominator
    return {"name": name, "ratio": ratio, "target": target, "pass": ratio >= target}


def _tps(runs: dict, key: str) -> float | None:
    return runs[key]["tokens_per_s"] if key in runs else None


def targets(runs: dict) -> dict:
    """Pass/fail of each target; ``pass`` is None when a configuration it needs was not run."""
    lora = [t for t in (_tps(runs, "a"), _tps(runs, "b")) if t is not None]
    engine_rss = [r["peak_rss_bytes"] for r in runs.values() if r["system"] == "engine"]
    rss = max(engine_rss) if engine_rss else None
    return {
        "a_vs_d": _ratio("(a)/(d)", _tps(runs, "a"), _tps(runs, "d"), ENGINE_VS_PEFT),
        "best_lora_vs_base": _ratio("max((a),(b))/(c)", max(lora) if lora else None, _tps(runs, "c"), LORA_VS_BASE),
        "peak_rss": {"name": "engine peak RSS", "max_bytes": rss, "max_gib": rss / GIB if rss else None,
                     "limit_bytes": RSS_LIMIT_BYTES, "pass": rss <= RSS_LIMIT_BYTES if rss else None},
    }


def decode_efficiency(run: dict | None) -> dict | None:
    """Achieved FLOP/s of the run's decode-only steps as a fraction of the bf16 matmul peak."""
    if run is None or "decode" not in run or "matmul_peak" not in run:
        return None
    decode, peak = run["decode"], run["matmul_peak"]
    achieved = decode["flops_per_s"]
    return {"config": run["config"], **decode, "matmul_peak": peak,
            "fraction_of_best_peak": achieved / peak["best_flops_per_s"],
            "fraction_of_median_peak": achieved / peak["median_flops_per_s"]}


def ratios(runs: dict) -> dict:
    """Every engine configuration's throughput relative to each baseline that ran."""
    out = {}
    for num in ("a", "b", "c"):
        for den in ("c", "d", "e"):
            if num != den and num in runs and den in runs:
                out[f"{num}/{den}"] = runs[num]["tokens_per_s"] / runs[den]["tokens_per_s"]
    return out
