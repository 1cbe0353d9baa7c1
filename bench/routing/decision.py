"""Microbenchmark: the cost of one routing decision (64 workers x 32 running requests).

Each decision asks ``rank_aware`` (and, for context, every other policy) to place a
random request on 64 workers, each running 32 requests of random rank in
{8, 16, 32, 64} with random contexts, some with a few queued requests and part of
the adapters resident. The incremental policy reads each worker's BatchStats; the
naive baseline runs the same Algorithm 1 but rebuilds every worker's sums from its
request list on each decision. Both must pick the same worker every time.

The perf model is ``--profile`` if given, else one with every term non-zero (the
coefficient values do not change how long an evaluation takes).

    python -m bench.routing.decision [--decisions 3000] [--profile FILE]

Wall-clock percentiles are the measure; per-thread CPU time is reported beside them,
with the load average, because a shared machine's preemptions land in the wall-clock
tail. Prints JSON; writes bench/results/routing_decision-cpu.json and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

from bench.paths import RESULTS
from services.scheduler.policies import POLICY_NAMES, PolicyConfig, PolicyRequest, make_policy
from services.scheduler.worker_view import WorkerView
from shared.batch_stats import BatchStats
from shared.levels import Level
from shared.perf_model import TERMS, PerfModel, current_device_name
from shared.schemas import RequestLoad
from shared.schemas.names import request_key

TARGET_P99_US = 500.0
RANKS = (8, 16, 32, 64)


def _all_terms_model() -> PerfModel:
    coef = dict(zip(TERMS, (30000.0, 150.0, 4.0, 2.5, 0.4, 0.01, 0.02, 1e-4, 20.0)))
    return PerfModel.from_coefficients("bgmv", coef, coef, {"host": {"const": 3000.0, "sum_rank": 50.0},
                                                            "disk": {"const": 30000.0, "sum_rank": 500.0}})


def _load(rank: int, tokens: int, adapter: str, request_id: str) -> RequestLoad:
    """A request of ``tokens`` context tokens as a worker's state reports it."""
    return RequestLoad(key=request_key(request_id), adapter=adapter, rank=rank, prompt_tokens=tokens)


def make_cluster(workers: int, running: int, seed: int) -> tuple[list[WorkerView], list[dict]]:
    """Views and, per worker, the plain request lists the naive baseline loops over."""
    rng = random.Random(seed)
    adapters = [f"adapter-{i}" for i in range(256)]
    views, lists = [], []
    for w in range(workers):
        run = [_load(rng.choice(RANKS), rng.randrange(16, 1500), rng.choice(adapters), f"w{w}-run-{j}")
               for j in range(running)]
        wait = [_load(rng.choice(RANKS), rng.randrange(16, 800), rng.choice(adapters), f"w{w}-wait-{j}")
                for j in range(rng.choice((0, 0, 1, 3)))]
        resident = set(rng.sample(adapters, 24))
        views.append(WorkerView.build(f"w{w}", max_batch=64, running=run, waiting=wait, resident=resident,
                                      host=set(adapters[:128])))
        lists.append({"running": run, "waiting": wait, "resident": resident, "host": set(adapters[:128])})
    return views, lists


def _naive_padding_extension(perf: PerfModel, everything: list[RequestLoad], rank: int) -> float:
    """RankAware's padding_lifetime term, from the request list."""
    lower = [r for r in everything if r.rank < rank]
    if not lower or max(r.rank for r in everything) < rank:
        return 0.0
    at_least = len(everything) - len(lower)
    tokens = sum(r.context_tokens for r in everything) * len(lower) / len(everything)
    return perf.decode.padding(len(lower), tokens, max(r.rank for r in lower), rank) / (at_least + 1)


def naive_rank_aware(perf: PerfModel, lists: list[dict], req: PolicyRequest, slo_us: float, avg_len: float,
                     max_batch: int, typical_prompt: float) -> int:
    """Algorithm 1 as in policies.RankAware (default terms), re-aggregating every request on every decision."""
    inv_len = 1.0 / avg_len
    solo = perf.prefill.cost(BatchStats.from_requests([req.rank], [req.prompt_tokens], [req.adapter]))
    typical = perf.prefill.cost_of(1, req.rank, req.rank, typical_prompt, typical_prompt * req.rank,
                                   typical_prompt ** 2, 1)
    best = [[-1, float("inf"), float("inf")] for _ in range(3)]  # feasible with room, with room, full
    for i, worker in enumerate(lists):
        everything = worker["running"] + worker["waiting"]
        exists = BatchStats.from_requests([r.rank for r in everything], [r.context_tokens for r in everything],
                                          [r.adapter for r in everything])
        waiting = worker["waiting"]
        queue = BatchStats.from_requests([r.rank for r in waiting], [r.context_tokens for r in waiting],
                                         [r.adapter for r in waiting])
        n = exists.count
        before, after = perf.decode.cost(exists), perf.decode.cost_with(exists, req.rank, req.prompt_tokens,
                                                                        req.adapter)
        d_decode = after - before + _naive_padding_extension(perf, everything, req.rank)
        room = n + 1 <= max_batch
        wait = 0.0 if room else max(1, n + 1 - max_batch) * avg_len * before / n
        predicted = after + (n * typical + solo) * inv_len + wait * inv_len
        d_prefill = (perf.prefill.cost_with(queue, req.rank, req.prompt_tokens, req.adapter) - perf.prefill.cost(queue)
                     if queue.count else solo)
        if req.adapter not in worker["resident"]:
            level = Level.HOST if req.adapter in worker["host"] else Level.DISK
            d_prefill += perf.cold_start_us(req.rank, req.prompt_tokens, level)
        total = (d_prefill * inv_len + d_decode) * n + wait * inv_len
        for tier in ((best[0], best[1]) if predicted <= slo_us else (best[1],)) if room else (best[2],):
            tie = 1e-6 * (1.0 + tier[1]) if tier[0] >= 0 else 0.0
            if total < tier[1] - tie or total <= tier[1] + tie and predicted < tier[2]:
                tier[0], tier[1], tier[2] = i, total, predicted
    return next(c for c in (best[0][0], best[1][0], best[2][0], 0) if c >= 0)


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    us = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "mean_us": float(us.mean()), "max_us": float(us.max())}


def run(decisions: int, workers: int, running: int, perf: PerfModel, seed: int) -> tuple[dict, dict]:
    views, lists = make_cluster(workers, running, seed)
    rng = random.Random(seed + 1)
    requests = [PolicyRequest(rng.choice(RANKS), rng.randrange(16, 800), f"adapter-{rng.randrange(256)}")
                for _ in range(decisions)]
    slo_us = 10 * perf.decode_us(views[0].total)  # loose enough that most workers are feasible
    avg_len = 128.0
    wall: dict[str, list[int]] = {}
    cpu: dict[str, list[int]] = {}
    picks: dict[str, list[str]] = {}
    load_before = os.getloadavg()
    for name in POLICY_NAMES:
        policy = make_policy(PolicyConfig(policy=name, avg_response_len=avg_len), perf, slo_us)
        policy.choose(views, requests[0])  # warm up
        wall[name], cpu[name], picks[name] = [], [], []
        for req in requests:
            start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
            choice = policy.choose(views, req)
            cpu[name].append(time.thread_time_ns() - start_cpu)
            wall[name].append(time.perf_counter_ns() - start)
            picks[name].append(choice)
    naive = "naive_rank_aware"
    wall[naive], cpu[naive], agree = [], [], True
    for req, chosen in zip(requests, picks["rank_aware"]):
        start, start_cpu = time.perf_counter_ns(), time.thread_time_ns()
        index = naive_rank_aware(perf, lists, req, slo_us, avg_len, 64, PolicyConfig().reference_prompt_tokens)
        cpu[naive].append(time.thread_time_ns() - start_cpu)
        wall[naive].append(time.perf_counter_ns() - start)
        agree &= views[index].worker_id == chosen
    fast, slow = _percentiles(wall["rank_aware"]), _percentiles(wall[naive])
    report = {
        "bench": "routing_decision", "device": "cpu", "device_name": current_device_name("cpu"),
        "python": platform.python_version(), "cores": os.cpu_count(),
        "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]],
        "workers": workers, "running_per_worker": running, "decisions": decisions,
        "rank_aware": fast, "naive_rank_aware": slow,
        "naive_over_incremental_p50": slow["p50_us"] / fast["p50_us"],
        "naive_over_incremental_p99": slow["p99_us"] / fast["p99_us"],
        "decisions_agree": bool(agree), "target_p99_us": TARGET_P99_US,
        "meets_target": fast["p99_us"] <= TARGET_P99_US,
        "thread_cpu_time": {n: _percentiles(cpu[n]) for n in ("rank_aware", naive)},
        "other_policies": {n: _percentiles(wall[n]) for n in POLICY_NAMES if n != "rank_aware"},
    }
    return report, {"rank_aware": wall["rank_aware"], "naive rank_aware": wall[naive]}


def plot(path: Path, samples: dict[str, list[int]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, ns in samples.items():
        us = np.sort(np.asarray(ns) / 1e3)
        ax.plot(us, np.arange(1, len(us) + 1) / len(us), label=name)
    ax.axvline(TARGET_P99_US, color="grey", linestyle=":", label="p99 target")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("routing decision (us), 64 workers x 32 running")
    ax.set_ylabel("CDF")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="routing decision cost")
    parser.add_argument("--decisions", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--running", type=int, default=32)
    parser.add_argument("--profile", default="", help="perf profile JSON (default: every term active)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "routing_decision-cpu.json"))
    args = parser.parse_args(argv)
    if args.decisions < 10 or args.workers < 1 or args.running < 0:
        parser.error("need --decisions >= 10, --workers >= 1, --running >= 0")
    perf = PerfModel.load(args.profile) if args.profile else _all_terms_model()
    report, samples = run(args.decisions, args.workers, args.running, perf, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    plot(out.with_suffix(".png"), samples)
    print(json.dumps(report, indent=1))
    return 0 if report["decisions_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
