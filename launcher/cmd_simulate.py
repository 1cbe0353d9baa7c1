"""`caraserve simulate`: compare routing policies on a simulated cluster.

    caraserve simulate --profile FILE --workers N (--rate RPS --duration S | --trace FILE)
        [--popularity FILE.npy | --adapters K] --ranks 8,16,32,64 --policy P[,P...]
        [--max-batch 32] [--slo-ms X] [--seed K] --json OUT [--plot OUT.png]
        [--sweep-rates r1,r2,...]

The JSON holds ``{"slo_ms", "requests", "policies": {NAME: {"slo_attainment",
"ttft_mean_ms", "ttft_p99_ms", "tpt_mean_ms", "tpt_p99_ms", "e2e_mean_ms",
"e2e_p99_ms", ...}}}`` for the main workload, plus ``"sweep"`` (metrics per policy
at each rate) with ``--sweep-rates`` (Poisson, over ``--duration``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

from launcher.cli import CliError
from shared.config import ConfigError, add_arguments, from_namespace


def register(subparsers) -> None:
    from services.scheduler.simulator import SimulatorConfig
    from services.scheduler.workload import WorkloadConfig

    p = subparsers.add_parser("simulate", help="simulate a cluster under routing policies")
    p.add_argument("--profile", required=True, help="performance profile JSON (from `caraserve profile`)")
    p.add_argument("--ranks", default="8,16,32,64", help="comma-separated adapter ranks (default: 8,16,32,64)")
    p.add_argument("--policy", default="rank_aware", help="comma-separated policies, or all (default: rank_aware)")
    p.add_argument("--slo-ms", type=float, default=0.0,
                   help="time-per-token SLO in ms (default: 1.5x the profile's no-LoRA time per token)")
    p.add_argument("--sweep-rates", default="", help="comma-separated Poisson rates for a load sweep")
    p.add_argument("--json", required=True, dest="json_out", help="write the results here")
    p.add_argument("--plot", default="", help="write attainment and time-per-token figures here (PNG)")
    add_arguments(p, WorkloadConfig)
    add_arguments(p, SimulatorConfig)
    p.set_defaults(func=run)


def _numbers(text: str, flag: str, kind: type) -> tuple:
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise CliError(f"{flag} expects comma-separated numbers, got {text!r}") from exc
    if not values:
        raise CliError(f"{flag} expects at least one number")
    return values


def _configs(args: argparse.Namespace):
    from services.scheduler.simulator import SimulatorConfig
    from services.scheduler.workload import WorkloadConfig

    ranks = _numbers(args.ranks, "--ranks", int)
    try:
        return from_namespace(WorkloadConfig, args, ranks=ranks), from_namespace(SimulatorConfig, args)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc


def _finite(value):
    """JSON-safe: NaN/inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def run(args: argparse.Namespace) -> int:
    from services.scheduler import experiment
    from services.scheduler.policies import PolicyError
    from services.scheduler.workload import WorkloadError, generate
    from shared.perf_model import PerfModel, ProfileError

    workload_config, sim_config = _configs(args)
    rates = _numbers(args.sweep_rates, "--sweep-rates", float) if args.sweep_rates else ()
    if rates and workload_config.duration <= 0:
        raise CliError("--sweep-rates needs --duration")
    if args.slo_ms < 0:
        raise CliError("--slo-ms must be >= 0")
    try:
        names = experiment.parse_policies(args.policy)
        perf = PerfModel.load(args.profile)
        workload = generate(workload_config)
        if len(workload) == 0:
            raise CliError("the workload has no requests (raise --rate or --duration)")
        slo_ms = experiment.resolve_slo_ms(perf, args.slo_ms, sim_config, workload_config)
        template = experiment.policy_template(workload_config, slo_ms, workload_config.seed)
        runs = experiment.run_policies(perf, workload, names, sim_config, template, slo_ms)
        logging.getLogger(experiment.__name__).setLevel(logging.INFO)  # a sweep's progress shows at any --log-level
        sweep = experiment.load_sweep(perf, workload_config, rates, names, sim_config, slo_ms,
                                      experiment.log_progress("sweep")) if rates else None
    except (ProfileError, WorkloadError, PolicyError, ConfigError) as exc:
        raise CliError(str(exc)) from exc

    report = {
        "slo_ms": slo_ms,
        "requests": len(workload),
        "policies": {name: run.metrics for name, run in runs.items()},
        "workers": sim_config.workers,
        "max_batch": sim_config.max_batch,
        "workload": {"rate": workload_config.rate, "duration": workload_config.duration,
                     "trace": workload_config.trace, "popularity": workload_config.popularity,
                     "adapters": workload_config.adapters, "ranks": list(workload_config.ranks),
                     "seed": workload_config.seed},
        "profile": {"path": os.fspath(args.profile), "backend": perf.backend, "model": perf.info.model,
                    "device_name": perf.info.device_name, "synthetic": perf.info.synthetic},
    }
    if sweep is not None:
        report["sweep"] = {"rates": list(rates), "policies": sweep}
    _write_json(args.json_out, _finite(report))
    if args.plot:
        from services.scheduler.sim_plots import save_simulation_figure

        save_simulation_figure(args.plot, {n: r.tpt_ms for n, r in runs.items()}, slo_ms,
                               {n: r.metrics["slo_attainment"] for n, r in runs.items()}, sweep)
    _print_table(report)
    return 0


def _write_json(path: str, report: dict) -> None:
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _print_table(report: dict) -> None:
    out = sys.stdout
    out.write(f"{report['requests']} requests, {report['workers']} workers, SLO {report['slo_ms']:.2f} ms/token\n")
    out.write(f"{'policy':18s} {'attain%':>8s} {'ttft ms':>9s} {'tpt ms':>8s} {'tpt p99':>8s} {'e2e ms':>9s}\n")
    for name, m in report["policies"].items():
        def fmt(key: str, width: int) -> str:
            value = m.get(key)
            return f"{value:{width}.1f}" if value is not None else f"{'-':>{width}s}"
        out.write(f"{name:18s} {100 * (m['slo_attainment'] or 0):8.2f} {fmt('ttft_mean_ms', 9)} "
                  f"{fmt('tpt_mean_ms', 8)} {fmt('tpt_p99_ms', 8)} {fmt('e2e_mean_ms', 9)}\n")
