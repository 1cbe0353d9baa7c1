"""Benchmark: how fast the cluster simulator runs (target: 100,000 requests, 64 workers, <= 60 s).

Simulates a Poisson workload of ``--requests`` requests on ``--workers`` workers
(max batch 32, ranks {8, 16, 32, 64}, 512 uniform adapters) once per policy and
reports the wall time of each run. ``rank_aware`` is the slowest policy (it
evaluates the perf model four times per worker per decision). The default rate,
50 rps, is just under what rank_aware holds on 64 workers with the CPU profiles
(bench/routing/sched_sweep.py), so the run times a cluster at work rather than a queue that
grows without bound.

    python -m bench.routing.simulator_speed --profile FILE [--requests 100000] [--workers 64] [--rate 50]

Prints JSON; writes bench/results/simulator_speed-cpu.json. The JSON records whether
the profile was synthetic.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from bench.paths import RESULTS
from services.scheduler.sim.experiment import parse_policies, policy_template, resolve_slo_ms, run_policies
from services.scheduler.sim.simulator import SimulatorConfig
from services.scheduler.sim.workload import WorkloadConfig, generate
from shared.perf_model import PerfModel, current_device_name

TARGET_REQUESTS, TARGET_WORKERS, TARGET_SECONDS = 100_000, 64, 60.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="cluster simulator speed")
    parser.add_argument("--profile", required=True, help="perf profile JSON")
    parser.add_argument("--requests", type=int, default=TARGET_REQUESTS, help="expected number of requests")
    parser.add_argument("--workers", type=int, default=TARGET_WORKERS)
    parser.add_argument("--rate", type=float, default=50.0, help="Poisson rate (requests/s)")
    parser.add_argument("--policy", default="rank_aware,least_loaded", help="comma-separated policies, or all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "simulator_speed-cpu.json"))
    args = parser.parse_args(argv)
    if args.requests < 1 or args.workers < 1 or args.rate <= 0:
        parser.error("--requests, --workers and --rate must be positive")
    perf = PerfModel.load(args.profile)
    workload_config = WorkloadConfig(rate=args.rate, duration=args.requests / args.rate, adapters=512, seed=args.seed)
    sim = SimulatorConfig(workers=args.workers, max_batch=32)
    start = time.perf_counter()
    workload = generate(workload_config)
    generate_s = time.perf_counter() - start
    slo_ms = resolve_slo_ms(perf, 0.0, sim, workload_config)
    runs = run_policies(perf, workload, parse_policies(args.policy), sim,
                        policy_template(workload_config, slo_ms, args.seed), slo_ms)
    big_enough = len(workload) >= TARGET_REQUESTS and args.workers >= TARGET_WORKERS
    report = {
        "bench": "simulator_speed", "device": "cpu", "device_name": current_device_name("cpu"),
        "python": platform.python_version(), "cores": os.cpu_count(), "loadavg_1m": os.getloadavg()[0],
        "requests": len(workload), "workers": args.workers, "rate": args.rate, "max_batch": 32,
        "workload_generation_s": generate_s, "slo_ms": slo_ms,
        "profile": {"path": args.profile, "backend": perf.backend, "synthetic": perf.info.synthetic},
        "policies": {name: {"seconds": r.metrics["sim_seconds"],
                            "requests_per_second": len(workload) / r.metrics["sim_seconds"],
                            "slo_attainment": r.metrics["slo_attainment"],
                            "meets_target": big_enough and r.metrics["sim_seconds"] <= TARGET_SECONDS}
                     for name, r in runs.items()},
        "target": f">= {TARGET_REQUESTS} requests on >= {TARGET_WORKERS} workers in <= {TARGET_SECONDS:.0f} s",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
