"""`caraserve simulate`: compare routing policies on a simulated cluster.

    caraserve simulate --profile FILE --workers N (--rate RPS --duration S | --trace FILE)
        [--popularity FILE.npy | --adapters K] --ranks 8,16,32,64 --policy P[,P...]
        [--max-batch 32] [--slo-ms X] [--seed K] --json OUT [--plot OUT.png]
        [--sweep-rates r1,r2,...]
    caraserve simulate --profile A.json:16 --profile B.json:16 ...   # a heterogeneous fleet

``--profile`` repeats: each ``PATH:COUNT`` is a worker group of COUNT workers timed by, and
priced (rank_aware) with, that profile; a bare ``PATH`` is ``--workers`` workers of it. Every
profile must be of the same model (digest). The fleet's SLO is ``--slo-ms``, else the fastest
profile's default (``experiment.resolve_slo_ms``); the same number scores attainment.

The JSON holds ``{"slo_ms", "requests", "policies": {NAME: {"slo_attainment",
"ttft_mean_ms", "ttft_p99_ms", "tpt_mean_ms", "tpt_p99_ms", "e2e_mean_ms",
"e2e_p99_ms", ...}}}`` for the main workload, plus ``"sweep"`` (metrics per policy
at each rate) with ``--sweep-rates`` (Poisson, over ``--duration``), ``"workers"`` (all
groups together), ``"fleet"`` (per group: its profile and count) and ``"profile"`` (the one
the default SLO comes from).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

from launcher.cli import CliError
from shared.config import ConfigError, add_arguments, from_namespace


def register(subparsers) -> None:
    from services.scheduler.sim.simulator import SimulatorConfig
    from services.scheduler.sim.workload import WorkloadConfig

    p = subparsers.add_parser("simulate", help="simulate a cluster under routing policies")
    p.add_argument("--profile", required=True, action="append", metavar="PATH[:COUNT]",
                   help="performance profile JSON (from `caraserve profile`). Repeat it as PATH:COUNT for a "
                        "heterogeneous fleet, e.g. --profile a10.json:16 --profile a100.json:16: COUNT workers "
                        "each timed by, and priced with, their own profile; a bare PATH means --workers workers "
                        "of it. All profiles must be of one model. The default SLO is the fastest profile's")
    p.add_argument("--ranks", default="8,16,32,64", help="comma-separated adapter ranks (default: 8,16,32,64)")
    p.add_argument("--policy", default="rank_aware", help="comma-separated policies, or all (default: rank_aware)")
    p.add_argument("--slo-ms", type=float, default=0.0,
                   help="time-per-token SLO in ms, one for the whole fleet (default: 1.5x the no-LoRA time per "
                        "token of the fastest profile)")
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


def parse_profile_spec(spec: str, workers: int) -> tuple[str, int]:
    """``PATH:COUNT`` -> (PATH, COUNT); a bare ``PATH`` (no ``:`` + integer at its end) -> (PATH, workers)."""
    match = re.fullmatch(r"(.+):([+-]?\d+)", spec)
    if match is None:
        return spec, workers
    count = int(match.group(2))
    if count < 1:
        raise CliError(f"--profile {spec}: COUNT must be >= 1, got {count}")
    return match.group(1), count


def load_fleet(specs: list[str], workers: int):
    """The worker groups of the ``--profile`` specs, each profile loaded and of one model."""
    from services.scheduler.sim.simulator import WorkerGroup
    from shared.perf_model import PerfModel, ProfileError

    groups, paths = [], []
    for spec in specs:
        path, count = parse_profile_spec(spec, workers)
        try:
            perf = PerfModel.load(path)
        except ProfileError as exc:
            raise CliError(f"--profile {spec}: {exc}") from exc
        first = groups[0].perf.info if groups else perf.info
        if perf.info.model_digest != first.model_digest:
            raise CliError(f"--profile {spec}: a profile of model {perf.info.model!r} (digest "
                           f"{perf.info.model_digest!r}), not of {first.model!r} ({first.model_digest!r}) "
                           f"like {paths[0]}; a fleet serves one model")
        groups.append(WorkerGroup(perf, count))
        paths.append(path)
    return groups, paths


def _configs(args: argparse.Namespace):
    from services.scheduler.sim.simulator import SimulatorConfig
    from services.scheduler.sim.workload import WorkloadConfig

    ranks = _numbers(args.ranks, "--ranks", int)
    try:
        return from_namespace(WorkloadConfig, args, ranks=ranks), from_namespace(SimulatorConfig, args)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc


def run(args: argparse.Namespace) -> int:
    from services.scheduler.sim import experiment
    from services.scheduler.sim.metrics import json_safe
    from services.scheduler.policies import PolicyError
    from services.scheduler.sim.workload import WorkloadError, generate
    from shared.perf_model import ProfileError

    workload_config, sim_config = _configs(args)
    rates = _numbers(args.sweep_rates, "--sweep-rates", float) if args.sweep_rates else ()
    if rates and workload_config.duration <= 0:
        raise CliError("--sweep-rates needs --duration")
    if args.slo_ms < 0:
        raise CliError("--slo-ms must be >= 0")
    try:
        names = experiment.parse_policies(args.policy)
        fleet, paths = load_fleet(args.profile, sim_config.workers)
        workload = generate(workload_config)
        if len(workload) == 0:
            raise CliError("the workload has no requests (raise --rate or --duration)")
        slo_ms = experiment.resolve_slo_ms(fleet, args.slo_ms, sim_config, workload_config)
        template = experiment.policy_template(workload_config, slo_ms, workload_config.seed)
        runs = experiment.run_policies(fleet, workload, names, sim_config, template, slo_ms)
        logging.getLogger(experiment.__name__).setLevel(logging.INFO)  # a sweep's progress shows at any --log-level
        sweep = experiment.load_sweep(fleet, workload_config, rates, names, sim_config, slo_ms,
                                      experiment.log_progress("sweep")) if rates else None
    except (ProfileError, WorkloadError, PolicyError, ConfigError) as exc:
        raise CliError(str(exc)) from exc

    profiles = [_profile_info(path, group.perf) for path, group in zip(paths, fleet)]
    fastest = experiment.fastest_model(fleet, sim_config, workload_config)
    report = {
        "slo_ms": slo_ms,
        "requests": len(workload),
        "policies": {name: run.metrics for name, run in runs.items()},
        "workers": sum(group.count for group in fleet),
        "max_batch": sim_config.max_batch,
        "workload": {"rate": workload_config.rate, "duration": workload_config.duration,
                     "trace": workload_config.trace, "popularity": workload_config.popularity,
                     "adapters": workload_config.adapters, "ranks": list(workload_config.ranks),
                     "seed": workload_config.seed},
        "profile": next(p for p, group in zip(profiles, fleet) if group.perf is fastest),
        "fleet": [{**p, "count": group.count} for p, group in zip(profiles, fleet)],
    }
    if sweep is not None:
        report["sweep"] = {"rates": list(rates), "policies": sweep}
    _write_json(args.json_out, json_safe(report))
    if args.plot:
        from services.scheduler.sim.plots import save_simulation_figure

        save_simulation_figure(args.plot, {n: r.tpt_ms for n, r in runs.items()}, slo_ms,
                               {n: r.metrics["slo_attainment"] for n, r in runs.items()}, sweep)
    _print_table(report)
    return 0


def _profile_info(path: str, perf) -> dict:
    return {"path": os.fspath(path), "backend": perf.backend, "model": perf.info.model,
            "device_name": perf.info.device_name, "synthetic": perf.info.synthetic}


def _write_json(path: str, report: dict) -> None:
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _print_table(report: dict) -> None:
    out = sys.stdout
    out.write(f"{report['requests']} requests, {report['workers']} workers, SLO {report['slo_ms']:.2f} ms/token\n")
    if len(report["fleet"]) > 1:
        groups = ", ".join(f"{g['count']} x {g['path']}" for g in report["fleet"])
        out.write(f"fleet: {groups}; SLO from {report['profile']['path']}\n")
    out.write(f"{'policy':18s} {'attain%':>8s} {'ttft ms':>9s} {'tpt ms':>8s} {'tpt p99':>8s} {'e2e ms':>9s}\n")
    for name, m in report["policies"].items():
        def fmt(key: str, width: int) -> str:
            value = m.get(key)
            return f"{value:{width}.1f}" if value is not None else f"{'-':>{width}s}"
        out.write(f"{name:18s} {100 * (m['slo_attainment'] or 0):8.2f} {fmt('ttft_mean_ms', 9)} "
                  f"{fmt('tpt_mean_ms', 8)} {fmt('tpt_p99_ms', 8)} {fmt('e2e_mean_ms', 9)}\n")
