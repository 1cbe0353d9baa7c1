"""The scheduling sweep on a heterogeneous fleet: SLO attainment vs load, every policy.

The fleet has two worker groups of ``--workers-per-group`` workers each:

- **A**: the committed CPU profile (default ``bench/results/profile-mbgmv-cpu.json``);
- **B**: the same profile with its rank-dependent decode and prefill coefficients
  (``batch_max_rank``, ``sum_rank``, ``tokens_max_rank``, ``token_rank``) multiplied by
  ``--rank-factor`` (default 3): a device whose LoRA work is 3x slower per rank, its base
  model as fast (:func:`scale_rank_terms`; its cold-start costs are A's). B is a what-if
  derived from A's measurements, not a second measured device; the JSON says so.

Each simulated worker is timed by its group's model and its view carries that model, so
rank_aware prices it by its own costs (``services/scheduler/sim/simulator.py``). The SLO is one
number for the fleet: ``--slo-ms``, else 1.5x the no-LoRA time per token of the fastest
group's profile (``experiment.resolve_slo_ms``; A and B share the base-model costs, so it is
A's and B's alike). It is given to rank_aware and scores attainment.

Workload: the adapters follow the paper's MAF popularity (``popularity_512.npy`` from
``<repo>/../shared/data/maf``, 512 adapters, skewed), each with a rank drawn uniformly from
{8, 16, 32, 64}; Poisson arrivals for ``--duration`` s at each rate, seeded, with the
simulator's default log-normal lengths. (The MAF arrival trace itself spans only 288 s at
~7.7 rps; a load sweep needs its rate set, so arrivals are Poisson, as in
``bench/routing/sched_sweep.py``.) Rates: ``--points`` loads from 0.1 to 1.0 times the fleet's
no-LoRA capacity (``bench.routing.sched_sweep.capacity_rps`` summed over the groups); the default 91
step by 1 % of it, the resolution of the highest loads and of their ratios.

It reports each policy's highest load at >= 99 % attainment (``highest_rate_at_99``) and
rank_aware's ratio to each baseline's, and per group where each policy sent its requests
(share, mean rank) at every rate.

    python -m bench.routing.sched_sweep_hetero [--quick]

Writes bench/results/sched_sweep_hetero-cpu.json and .png (outside bench/results for a
synthetic source profile). The default (16 + 16 workers, 600 s per rate, 91 points) took
4 min on this machine's CPU; ``--quick`` (8 + 8 workers, 300 s per rate, 31 points) is smaller.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.paths import MAF_DIR
from bench.routing.sched_sweep import HOLD, RESULTS, capacity_rps, output_path
from services.scheduler.sim.experiment import (highest_rate_meeting, load_sweep, log_progress, parse_policies,
                                               resolve_slo_ms)
from services.scheduler.sim.metrics import json_safe
from services.scheduler.sim.simulator import SimulatorConfig, WorkerGroup
from services.scheduler.sim.workload import WorkloadConfig
from shared.perf_model import LinearCost, PerfModel, ProfileError

MAF_POPULARITY = MAF_DIR / "popularity_512.npy"
RANK_TERMS = ("batch_max_rank", "sum_rank", "tokens_max_rank", "token_rank")
RANKS = (8, 16, 32, 64)
MAX_BATCH = 32


def _scaled(cost: LinearCost, factor: float) -> LinearCost:
    coef = [c * factor if term in RANK_TERMS else c for term, c in zip(cost.terms, cost.coef)]
    return LinearCost(cost.terms, coef, cost.r2_holdout, cost.r2_train, cost.n_train, cost.n_holdout,
                      cost.dropped_terms)


def scale_rank_terms(perf: PerfModel, factor: float) -> PerfModel:
    """``perf`` with its decode and prefill RANK_TERMS coefficients multiplied by ``factor``.

    Every other coefficient (base-model costs, per-adapter costs) and the cold-start costs
    are kept; the samples are dropped (they are the source's measurements, which the scaled
    model no longer fits), and ``device_name`` says what was done.
    """
    if not factor > 0:
        raise ProfileError(f"the rank factor must be > 0, got {factor!r}")
    info = dataclasses.replace(perf.info, device_name=f"{perf.info.device_name} (rank terms x{factor:g})")
    return PerfModel(info, _scaled(perf.decode, factor), _scaled(perf.prefill, factor), perf.cold_start,
                     (), perf.cpu_prefill)


def judge(points: dict[str, list[dict]]) -> dict:
    """Each policy's highest load at >= 99 %, and rank_aware's ratio to each baseline's."""
    highest = {name: highest_rate_meeting(series, HOLD) for name, series in points.items()}
    result: dict = {"highest_rate_at_99": highest}
    if "rank_aware" in highest:
        ours = highest["rank_aware"]
        result["rank_aware_ratio"] = {name: (ours / rate if rate > 0 else None)
                                      for name, rate in highest.items() if name != "rank_aware"}
    return result


def plot(path: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from services.scheduler.sim.plots import plot_attainment, plot_group_metric

    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.2))
    a, b = report["groups"]
    plot_attainment(left, report["policies"],
                    f"{a['count']}x A + {b['count']}x B (rank terms x{report['rank_factor']:g}): "
                    f"SLO {report['slo_ms']:.0f} ms/token")
    plot_group_metric(right, report["policies"], "group1_mean_rank", "mean rank of requests sent to B")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="SLO attainment vs load on a heterogeneous fleet, every policy")
    parser.add_argument("--profile", default=str(RESULTS / "profile-mbgmv-cpu.json"), help="group A's profile")
    parser.add_argument("--rank-factor", type=float, default=3.0,
                        help="group B = A with its rank-dependent coefficients multiplied by this")
    parser.add_argument("--workers-per-group", type=int, default=16)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of Poisson arrivals per point")
    parser.add_argument("--points", type=int, default=91, help="loads from 0.1 to 1.0x the no-LoRA capacity")
    parser.add_argument("--rates", default="", help="comma-separated rates instead of the grid")
    parser.add_argument("--slo-ms", type=float, default=0.0, help="SLO (default: the fastest group's, 1.5x no-LoRA)")
    parser.add_argument("--popularity", default=str(MAF_POPULARITY), help="adapter popularity (.npy)")
    parser.add_argument("--policy", default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="8 + 8 workers, 300 s per rate, 31 points")
    parser.add_argument("--out", default="", help="JSON path (a PNG is written next to it)")
    return parser


def sweep(args: argparse.Namespace) -> dict:
    """Load both groups, sweep every policy, and build the report."""
    names = parse_policies(args.policy)
    a = PerfModel.load(args.profile)
    fleet = [WorkerGroup(a, args.workers_per_group), WorkerGroup(scale_rank_terms(a, args.rank_factor),
                                                                   args.workers_per_group)]
    workload = WorkloadConfig(rate=1.0, duration=args.duration, popularity=args.popularity, ranks=RANKS,
                              seed=args.seed)
    sim = SimulatorConfig(workers=2 * args.workers_per_group, max_batch=MAX_BATCH)
    slo_ms = resolve_slo_ms(fleet, args.slo_ms, sim, workload)
    one = SimulatorConfig(workers=args.workers_per_group, max_batch=MAX_BATCH)
    capacity = sum(capacity_rps(group.perf, workload, one) for group in fleet)
    if args.rates:
        rates = [float(r) for r in args.rates.split(",")]
    else:
        rates = [round(float(r), 3) for r in np.linspace(0.1 * capacity, capacity, args.points)]
    start = time.perf_counter()
    points = load_sweep(fleet, workload, rates, names, sim, slo_ms, log_progress("hetero"))
    groups = [{"name": "A", "count": fleet[0].count, "profile": args.profile, "device_name": a.info.device_name},
              {"name": "B", "count": fleet[1].count, "derived_from": args.profile,
               "device_name": fleet[1].perf.info.device_name,
               "derivation": f"A's profile with the decode and prefill coefficients of {', '.join(RANK_TERMS)} "
                             f"multiplied by {args.rank_factor:g} (a what-if, not a measured device); "
                             "base-model, per-adapter and cold-start costs kept"}]
    return {"bench": "sched_sweep_hetero", "synthetic": a.info.synthetic, "backend": a.backend,
            "model": a.info.model, "groups": groups, "rank_factor": args.rank_factor, "max_batch": MAX_BATCH,
            "ranks": list(RANKS), "popularity": os.path.basename(args.popularity), "duration_s": args.duration,
            "seed": args.seed, "slo_ms": slo_ms,
            "slo_rule": "one SLO for the fleet: 1.5x the no-LoRA time per token of the fastest group's profile",
            "estimated_capacity_rps": capacity, "rates": rates, "seconds": time.perf_counter() - start,
            "cores": os.cpu_count(), "policies": points, **judge(points)}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.workers_per_group, args.duration, args.points = 8, 300.0, 31
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.workers_per_group < 1 or args.duration <= 0 or args.points < 2 or args.slo_ms < 0:
        parser.error("need --workers-per-group >= 1, --duration > 0, --points >= 2, --slo-ms >= 0")
    try:
        report = sweep(args)
    except (ProfileError, ValueError) as exc:
        print(f"sched_sweep_hetero: error: {exc}", file=sys.stderr)
        return 2
    out = output_path(args.out, report["synthetic"], "sched_sweep_hetero")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(json_safe(report), indent=1))
    plot(out.with_suffix(".png"), report)
    summary = {k: report[k] for k in ("slo_ms", "highest_rate_at_99", "rank_aware_ratio") if k in report}
    print(json.dumps({"out": str(out), "synthetic": report["synthetic"], **summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
