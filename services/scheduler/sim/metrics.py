"""Latency metrics of a simulation run.

Per request: TTFT = first token - arrival; E2E = finish - arrival; time per token
TPT = E2E / output tokens (the prefill's token included, so TPT covers the prefill
and every decode step, and queueing). A request meets the SLO when TPT <= SLO;
rejected requests count as misses and are left out of the latency statistics.

In a fleet of several worker groups, :func:`group_metrics` says where each policy sent
what: per group, its share of the requests, their mean rank and their attainment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from services.scheduler.sim.simulator import SimResult

METRIC_KEYS = ("slo_attainment", "ttft_mean_ms", "ttft_p99_ms", "tpt_mean_ms", "tpt_p99_ms",
               "e2e_mean_ms", "e2e_p99_ms")


def tpt_ms(result: SimResult) -> np.ndarray:
    """[n] time per token (ms) of each served request, in request order."""
    served = ~result.rejected
    return (result.finish_s[served] - result.arrival_s[served]) / result.output_tokens[served] * 1e3


def _mean_p99(x: np.ndarray) -> tuple[float, float]:
    if len(x) == 0:
        return math.nan, math.nan
    return float(x.mean()), float(np.percentile(x, 99))


def summarize(result: SimResult, slo_ms: float) -> dict[str, float]:
    """The METRIC_KEYS (plus served, rejected and throughput) of one run."""
    served = ~result.rejected
    n = len(result.arrival_s)
    ttft = (result.first_token_s[served] - result.arrival_s[served]) * 1e3
    e2e = (result.finish_s[served] - result.arrival_s[served]) * 1e3
    tpt = tpt_ms(result)
    out: dict[str, float] = {"slo_attainment": float(np.count_nonzero(tpt <= slo_ms)) / n if n else math.nan}
    for name, values in (("ttft", ttft), ("tpt", tpt), ("e2e", e2e)):
        out[f"{name}_mean_ms"], out[f"{name}_p99_ms"] = _mean_p99(values)
    span = float(result.finish_s[served].max() - result.arrival_s.min()) if served.any() else 0.0
    out["served"] = int(served.sum())
    out["rejected"] = int(n - served.sum())
    out["throughput_rps"] = out["served"] / span if span > 0 else math.nan
    return out


def group_metrics(result: SimResult, rank: np.ndarray, counts: Sequence[int], slo_ms: float) -> dict[str, float]:
    """``group{g}_share``, ``group{g}_mean_rank`` and ``group{g}_slo_attainment`` of each worker group.

    ``counts``: workers per group, in the simulator's worker order; ``rank``: [n] each request's rank.
    Shares are of all requests (rejected ones belong to no group); mean rank and attainment are
    of the requests the group served (NaN when it served none).
    """
    n = len(rank)
    group_of_worker = np.repeat(np.arange(len(counts)), counts)
    served = ~result.rejected
    group = np.full(n, -1)
    group[served] = group_of_worker[result.worker[served]]
    tpt = (result.finish_s - result.arrival_s) / result.output_tokens * 1e3
    out: dict[str, float] = {}
    for g in range(len(counts)):
        mine = group == g
        count = int(np.count_nonzero(mine))
        out[f"group{g}_share"] = count / n if n else math.nan
        out[f"group{g}_mean_rank"] = float(rank[mine].mean()) if count else math.nan
        out[f"group{g}_slo_attainment"] = float(np.count_nonzero(tpt[mine] <= slo_ms)) / count if count else math.nan
    return out


def json_safe(value):
    """``value`` with NaN and infinities (at any depth of dicts and lists) replaced by None, for JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
