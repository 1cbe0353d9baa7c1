"""The scheduling results: SLO attainment vs Poisson load, every policy, a bgmv and an mbgmv profile.

Setting: ``--workers`` workers, max batch 32, ranks {8, 16, 32, 64} drawn uniformly per
adapter over 512 uniform adapters, Poisson arrivals for ``--duration`` seconds at each
rate (default 1800: long enough that a load past a policy's capacity shows as a growing
queue rather than as a short burst it absorbs). The default of 64 workers is the scale
of the paper's simulation (60 instances): a policy that groups ranks has many workers
per rank to balance load over, and each adapter has enough requests in flight for
co-locating them to pay. ``--workers 8`` is the paper's testbed size. The SLO is
``--slo-ms`` or the default (1.5x the profile's no-LoRA time per token at max batch).
By default every adapter is resident on every worker. ``--adapter-slots N`` gives each
worker an LRU cache of N adapters instead, so adapter_affinity has residency to follow
(each load costs the profile's host-level cold start; free with a profile without cold-start data).
Per profile it reports:

- each policy's highest load up to which attainment stays >= 99%;
- rank_aware's over the best baseline's (target >= 1.2x);
- the loads at which rank_aware is >= 99% while the best baseline is < 90%;
- the grouping bound (``services.scheduler.sim.grouping_bound``): the most rank-homogeneous
  batches can multiply capacity by, and the mixed and grouped saturation throughputs.

Rates default to ``--points`` evenly spaced loads from 0.3 to 1.0 times the cluster's
no-LoRA capacity ``workers * max_batch / (mean output tokens * no-LoRA time per token)``
(LoRA only adds cost, so no policy holds past it); the default 71 points step by 1% of
it, which is the resolution of the highest loads and of their ratio. ``--rates``
overrides the grid.

    python -m bench.routing.sched_sweep --profile-bgmv B.json --profile-mbgmv M.json

Writes bench/results/sched_sweep-cpu.json and .png. Results from a synthetic profile
are labelled and written outside bench/results (default: the system temp directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.paths import RESULTS
from services.scheduler.sim.experiment import (highest_rate_meeting, load_sweep, log_progress, mean_lengths,
                                               parse_policies, resolve_slo_ms)
from services.scheduler.sim.grouping_bound import grouping_bound
from services.scheduler.sim.simulator import SimulatorConfig
from services.scheduler.sim.workload import WorkloadConfig
from shared.perf_model import PerfModel, ProfileError

HOLD, BASELINE_BELOW, RATIO_TARGET = 0.99, 0.90, 1.2


def capacity_rps(perf: PerfModel, workload: WorkloadConfig, sim: SimulatorConfig) -> float:
    prompt, output = mean_lengths(workload)
    return sim.workers * sim.max_batch / (output * perf.no_lora_tpt_us(sim.max_batch, prompt, output) / 1e6)


def default_rates(capacity: float, points: int) -> list[float]:
    return [round(float(r), 3) for r in np.linspace(0.3 * capacity, capacity, points)]


def judge(points: dict[str, list[dict]]) -> dict:
    """Highest loads at >= 99%, the ratio over the best baseline, and the separating loads."""
    highest = {name: highest_rate_meeting(series, HOLD) for name, series in points.items()}
    baselines = [n for n in points if n != "rank_aware"]
    result: dict = {"highest_rate_at_99": highest}
    if "rank_aware" not in points or not baselines:
        return result
    best = max(baselines, key=lambda n: highest[n])
    ratio = highest["rank_aware"] / highest[best] if highest[best] > 0 else float("inf")
    rates = [p["rate"] for p in points["rank_aware"]]
    separating = [rate for i, rate in enumerate(rates)
                  if points["rank_aware"][i]["slo_attainment"] >= HOLD
                  and max(points[n][i]["slo_attainment"] for n in baselines) < BASELINE_BELOW]
    result.update({"best_baseline": best, "rank_aware_over_best_baseline": ratio if np.isfinite(ratio) else None,
                   "separating_rates": separating, "meets_ratio_target": bool(ratio >= RATIO_TARGET),
                   "meets_separation_target": bool(separating)})
    return result


def sweep_profile(path: str, args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    perf = PerfModel.load(path)
    workload = WorkloadConfig(rate=1.0, duration=args.duration, adapters=512, ranks=(8, 16, 32, 64), seed=args.seed)
    sim = SimulatorConfig(workers=args.workers, max_batch=32, adapter_slots=args.adapter_slots)
    slo_ms = resolve_slo_ms(perf, args.slo_ms, sim, workload)
    capacity = capacity_rps(perf, workload, sim)
    bound = grouping_bound(perf, workload.ranks, sim.max_batch, *mean_lengths(workload))
    rates = [float(r) for r in args.rates.split(",")] if args.rates else default_rates(capacity, args.points)
    start = time.perf_counter()
    points = load_sweep(perf, workload, rates, names, sim, slo_ms, log_progress(perf.backend))
    return {"path": path, "backend": perf.backend, "model": perf.info.model, "device_name": perf.info.device_name,
            "synthetic": perf.info.synthetic, "slo_ms": slo_ms, "estimated_capacity_rps": capacity,
            "grouping_bound": bound.to_dict(sim.workers),
            "rates": rates, "seconds": time.perf_counter() - start, "policies": points, **judge(points)}


def sweep_profiles(paths: dict[str, str], args: argparse.Namespace, names: tuple[str, ...]) -> dict[str, dict]:
    """``sweep_profile`` of each backend's profile, ``args.jobs`` of them at once (one process each)."""
    if args.jobs == 1:
        return {backend: sweep_profile(path, args, names) for backend, path in paths.items()}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {backend: pool.submit(sweep_profile, path, args, names) for backend, path in paths.items()}
        return {backend: future.result() for backend, future in futures.items()}


def plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.scheduler.sim.plots import plot_attainment

    profiles = report["profiles"]
    fig, axes = plt.subplots(1, len(profiles), figsize=(5.5 * len(profiles), 4.2), squeeze=False)
    for ax, (backend, result) in zip(axes[0], profiles.items()):
        label = " (SYNTHETIC profile)" if result["synthetic"] else ""
        if report.get("adapter_slots"):
            label += f", {report['adapter_slots']} adapter slots/worker"
        plot_attainment(ax, result["policies"], f"{backend}: SLO {result['slo_ms']:.1f} ms/token{label}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def output_path(out: str, synthetic: bool, stem: str) -> Path:
    """Where a sweep's JSON goes: ``out`` if given (never under bench/results for a synthetic profile),
    else ``bench/results/<stem>-cpu.json``, or a temporary file for a synthetic profile."""
    if out:
        path = Path(out).resolve()
        if synthetic and RESULTS.resolve() in path.parents:
            raise SystemExit("refusing to write results of a synthetic profile under bench/results")
        return path
    if synthetic:
        return Path(tempfile.gettempdir()) / f"caraserve-{stem}-synthetic.json"
    return RESULTS / f"{stem}-cpu.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="SLO attainment vs load for every policy")
    parser.add_argument("--profile-bgmv", required=True)
    parser.add_argument("--profile-mbgmv", required=True)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of Poisson arrivals per point")
    parser.add_argument("--rates", default="", help="comma-separated rates (default: a grid around capacity)")
    parser.add_argument("--points", type=int, default=71, help="grid points when --rates is not given")
    parser.add_argument("--slo-ms", type=float, default=0.0, help="SLO (default: 1.5x no-LoRA time per token)")
    parser.add_argument("--adapter-slots", type=int, default=0,
                        help="adapters each worker caches (LRU); 0: every adapter always resident")
    parser.add_argument("--policy", default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="JSON path (a PNG is written next to it)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="profiles swept at once, one process each (results do not depend on it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if (args.workers < 1 or args.duration <= 0 or args.points < 2 or args.slo_ms < 0 or args.jobs < 1
            or args.adapter_slots < 0):
        parser.error("need --workers >= 1, --duration > 0, --points >= 2, --slo-ms >= 0, --jobs >= 1, "
                     "--adapter-slots >= 0")
    try:
        names = parse_policies(args.policy)
        profiles = sweep_profiles({"bgmv": args.profile_bgmv, "mbgmv": args.profile_mbgmv}, args, names)
    except (ProfileError, ValueError) as exc:
        print(f"sched_sweep: error: {exc}", file=sys.stderr)
        return 2
    synthetic = any(p["synthetic"] for p in profiles.values())
    report = {"bench": "sched_sweep", "synthetic": synthetic, "workers": args.workers, "max_batch": 32,
              "ranks": [8, 16, 32, 64], "adapters": 512, "adapter_slots": args.adapter_slots,
              "duration_s": args.duration, "seed": args.seed, "cores": os.cpu_count(), "profiles": profiles}
    slots = f"-slots{args.adapter_slots}" if args.adapter_slots else ""
    out = output_path(args.out, synthetic, f"sched_sweep{slots}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(out.with_suffix(".png"), report)
    summary = {backend: {k: p.get(k) for k in ("slo_ms", "highest_rate_at_99", "best_baseline",
                                                "rank_aware_over_best_baseline", "separating_rates",
                                                "meets_ratio_target", "meets_separation_target")}
               | {"grouping_bound": p["grouping_bound"]["bound"]}
               for backend, p in profiles.items()}
    print(json.dumps({"out": str(out), "synthetic": synthetic, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
