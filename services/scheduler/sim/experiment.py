"""Simulation experiments: several policies on one workload, and load sweeps.

Shared by ``caraserve simulate`` and the benchmarks, so both resolve the SLO and
configure the policies the same way:

- the SLO is ``slo_ms`` when given, else ``policies.default_slo_us`` at the
  cluster's max batch and the workload's mean prompt/output lengths;
- rank_aware's ``avg_response_len`` is the workload's mean output length and its
  ``reference_prompt_tokens`` (the typical prefill) the mean prompt length.

A fleet is a single profile or several worker groups (``simulator.WorkerGroup``), each with
its own model. Its SLO is one number for the whole fleet: ``slo_ms``, else the default SLO of
the *fastest* group's model (:func:`fastest_model`: the least default SLO, i.e. the fastest
base-model time per token), which is also rank_aware's default when it has no reference
model. The same number is given to rank_aware and used to score attainment. rank_aware gets
no reference model: every simulated worker's view carries its group's model, and it prices
each worker by that.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.scheduler.policies import POLICY_NAMES, PolicyConfig, PolicyError, default_slo_us, make_policy
from services.scheduler.sim.metrics import group_metrics, summarize, tpt_ms
from services.scheduler.sim.simulator import Fleet, SimulatorConfig, simulate, worker_groups
from services.scheduler.sim.workload import Workload, WorkloadConfig, generate, mean_length
from shared.perf_model import PerfModel

log = logging.getLogger(__name__)


@dataclass
class PolicyRun:
    """One policy's metrics on one workload, and its per-request time per token (ms)."""

    metrics: dict[str, float]
    tpt_ms: np.ndarray = field(repr=False)


def parse_policies(text: str) -> tuple[str, ...]:
    """``"rank_aware,random"`` -> names; ``"all"`` -> every policy."""
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    if names == ("all",):
        return POLICY_NAMES
    unknown = [p for p in names if p not in POLICY_NAMES]
    if not names or unknown:
        raise PolicyError(f"unknown policies {unknown or [text]}; choose from {', '.join(POLICY_NAMES)} or all")
    return names


def mean_lengths(workload: WorkloadConfig) -> tuple[float, float]:
    """Mean (prompt, output) tokens of the workload's length distributions."""
    return (mean_length(workload.prompt_median, workload.prompt_sigma, workload.prompt_max),
            mean_length(workload.output_median, workload.output_sigma, workload.output_max))


def _default_slo_us(perf: PerfModel, sim: SimulatorConfig, workload: WorkloadConfig) -> float:
    prompt, output = mean_lengths(workload)
    return default_slo_us(perf, sim.max_batch, prompt, output)


def fastest_model(fleet: Fleet, sim: SimulatorConfig, workload: WorkloadConfig) -> PerfModel:
    """The model of the fleet's group with the least default SLO (the first such group on a tie)."""
    return min((group.perf for group in worker_groups(fleet, sim.workers)),
               key=lambda perf: _default_slo_us(perf, sim, workload))


def resolve_slo_ms(fleet: Fleet, slo_ms: float, sim: SimulatorConfig, workload: WorkloadConfig) -> float:
    """``slo_ms`` if positive, else the default SLO of the fleet's fastest model (one profile: its own)."""
    if slo_ms > 0:
        return slo_ms
    return _default_slo_us(fastest_model(fleet, sim, workload), sim, workload) / 1000.0


def run_policies(fleet: Fleet, workload: Workload, names: Sequence[str], sim: SimulatorConfig,
                 template: PolicyConfig, slo_ms: float) -> dict[str, PolicyRun]:
    """Simulate ``workload`` on ``fleet`` once per policy name (policies built from ``template``;
    rank_aware with ``slo_ms`` and each worker's own model, module docstring). With several
    worker groups the metrics include :func:`metrics.group_metrics`."""
    counts = [group.count for group in worker_groups(fleet, sim.workers)]
    runs = {}
    for name in names:
        policy = make_policy(dataclasses.replace(template, policy=name), None, slo_ms * 1000.0)
        start = time.perf_counter()
        result = simulate(fleet, workload, policy, sim)
        metrics = summarize(result, slo_ms)
        if len(counts) > 1:
            metrics.update(group_metrics(result, workload.rank, counts, slo_ms))
        metrics["sim_seconds"] = time.perf_counter() - start
        runs[name] = PolicyRun(metrics, tpt_ms(result))
    return runs


def policy_template(workload: WorkloadConfig, slo_ms: float, seed: int) -> PolicyConfig:
    prompt, output = mean_lengths(workload)
    return PolicyConfig(slo_ms=slo_ms, avg_response_len=max(1.0, output), reference_prompt_tokens=prompt, seed=seed)


SweepProgress = Callable[[int, int, float, dict[str, PolicyRun]], None]


def load_sweep(fleet: Fleet, workload: WorkloadConfig, rates: Sequence[float], names: Sequence[str],
               sim: SimulatorConfig, slo_ms: float,
               progress: SweepProgress | None = None) -> dict[str, list[dict[str, float]]]:
    """Metrics per policy at each Poisson rate (the workload's duration and seed kept).

    ``progress(done, total, rate, runs)`` is called after each rate.
    """
    template = policy_template(workload, slo_ms, workload.seed)
    points: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for i, rate in enumerate(rates):
        config = dataclasses.replace(workload, rate=float(rate), trace="")
        runs = run_policies(fleet, generate(config), names, sim, template, slo_ms)
        for name in names:
            points[name].append({"rate": float(rate), **runs[name].metrics})
        if progress is not None:
            progress(i + 1, len(rates), float(rate), runs)
    return points


def log_progress(label: str) -> SweepProgress:
    """A SweepProgress that logs one INFO line per rate (attainment per policy)."""
    started = time.perf_counter()

    def report(done: int, total: int, rate: float, runs: dict[str, PolicyRun]) -> None:
        shares = " ".join(f"{name} {run.metrics['slo_attainment']:.3f}" for name, run in runs.items())
        log.info("[%s] %d/%d %.2f rps: %s (%.0f s)", label, done, total, rate, shares,
                 time.perf_counter() - started)
    return report


def highest_rate_meeting(points: Sequence[dict[str, float]], target: float) -> float:
    """The highest rate up to which every swept point has attainment >= target (0 if none)."""
    best = 0.0
    for point in sorted(points, key=lambda p: p["rate"]):
        if point["slo_attainment"] < target:
            break
        best = point["rate"]
    return best
