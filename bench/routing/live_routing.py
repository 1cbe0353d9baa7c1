"""Live routing check: gpu_workers under a mixed-rank workload, each routing decision replayed.

Starts the local stack (nats-server, one scheduler running ``rank_aware`` with its decision log
on, ``--workers`` gpu_workers, the gateway), sends the mixed-rank workload of
``bench/routing/live_workload.py`` over NATS and records every worker state. Then it re-runs
``make_policy(...).choose(views, request)`` on each logged decision's inputs and reports:

* ``decisions_agree`` / ``mismatches``: the scheduler's choices against the policy function's;
* ``lag``: how old the worker states behind the decisions were (``state_age_ms``: since the
  scheduler received the state, ``state_lag_ms``: since the worker took it), how many decisions
  counted routed-but-not-yet-visible (pending) requests, and the policy's own time;
* ``seq_behind``: per (decision, worker), how many newer states the worker had already taken
  when the scheduler decided on an older one.

The profile is ``--profile`` or a small one measured first (a few batch sizes and the served
adapters' ranks). Prints the JSON report; writes ``bench/results/live_routing-cpu.json`` (or
``--json OUT``).

    python -m bench.routing.live_routing [--model DIR --adapter-dir DIR] [--profile FILE] [--requests 40]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.paths import RESULTS
from bench.routing.live_workload import LiveWorkload, Outcome, drive, make_schedule, model_names
from launcher.local_stack import LocalStack, StackConfig
from services.scheduler.decision_log import DecisionLog
from services.scheduler.sim.decision_replay import Decision, LogHeader, lag_summary, percentiles, read_log, replay
from services.scheduler.fleet import Fleet
from services.scheduler.policies import Policy, PolicyConfig, PolicyRequest, make_policy
from shared.backends import BACKENDS
from shared.config import add_arguments, from_namespace
from shared.schemas import AdapterInfo, RequestLoad, WorkerState
from shared.schemas.names import request_key

SCHEDULER = "scheduler-0"


def decision_log_path(run_dir: Path) -> Path:
    """Where the (single) scheduler of a live run writes its decisions."""
    return Path(run_dir) / f"decisions-{SCHEDULER}.jsonl"


def live_stack_config(model: Path, adapter_dir: Path, profile: Path, run_dir: Path, workers: int = 2,
                      extra_env: dict[str, str] | None = None, **overrides: Any) -> StackConfig:
    """One rank_aware scheduler logging its decisions, ``workers`` gpu_workers, on free ports."""
    env = {"CARASERVE_DECISION_LOG": str(Path(run_dir) / "decisions-{name}.jsonl"), **(extra_env or {})}
    settings = dict(model=str(model), adapter_dir=str(adapter_dir), workers=workers, schedulers=1,
                    policy="rank_aware", profile=str(profile), http_port=0, nats_port=0, run_dir=str(run_dir),
                    extra_env=env)
    settings.update(overrides)
    return StackConfig(**settings)


@dataclass
class LiveRun:
    """A finished live run: what the clients got, what the workers published, what the scheduler logged."""

    outcome: Outcome
    header: LogHeader
    decisions: list[Decision]
    requests: int


def run_live(config: StackConfig, workload: LiveWorkload, timeout_s: float = 60.0) -> LiveRun:
    """Start the stack, run the workload, stop the stack, read the decision log."""
    with LocalStack(config) as stack:
        base, adapters = model_names(stack.http_url)
        schedule = make_schedule(base, adapters, workload)
        outcome = asyncio.run(drive(stack.nats_url, schedule, config.workers, timeout_s,
                                    stack.creds.credentials("operator")))
    header, decisions = read_log(decision_log_path(Path(config.run_dir)))
    return LiveRun(outcome, header, decisions, len(schedule))


def seq_behind(decisions: list[Decision], states: dict[str, list[WorkerState]]) -> list[int]:
    """Per (decision, candidate): states the worker had taken after the held one, before the decision."""
    behind = []
    for decision in decisions:
        for snapshot in decision.workers:
            held, published = snapshot["seq"], states.get(snapshot["worker_id"], [])
            behind.append(sum(1 for s in published if s.seq > held and s.timestamp <= decision.decided_at))
    return behind


def report(run: LiveRun, policy: Policy) -> dict[str, Any]:
    """The JSON report of a live run, with ``policy`` re-run on every decision."""
    mismatches = replay(policy, run.decisions)
    behind = seq_behind(run.decisions, run.outcome.states)
    finals = run.outcome.finals.values()
    routed = Counter(d.choice for d in run.decisions if d.choice is not None)
    return {"requests": run.requests, "completed": sum(1 for c in finals if c.finish_reason in ("length", "stop")),
            "errors": sum(1 for c in finals if c.error is not None), "wall_s": run.outcome.wall_s,
            "decisions": len(run.decisions), "routed_per_worker": dict(sorted(routed.items())),
            "ranks_routed": dict(sorted(Counter(d.request.rank for d in run.decisions).items())),
            "decisions_agree": not mismatches, "mismatches": [dataclasses.asdict(m) for m in mismatches],
            "slo_us": run.header.slo_us, "lag": lag_summary(run.decisions),
            "seq_behind": {**percentiles([float(b) for b in behind]), "stale_views": sum(1 for b in behind if b)}}


def _synthetic_fleet(workers: int, running: int, ranks: dict[str, int], rng: random.Random) -> Fleet:
    """``workers`` live workers, each running ``running`` requests of random adapters and lengths."""
    fleet = Fleet(dead_after_s=1e9, pending_ttl_s=1e9)
    infos = [AdapterInfo(name=a, rank=r, level="device") for a, r in ranks.items()]
    for w in range(workers):
        names = rng.choices(list(ranks), k=running)
        loads = [RequestLoad(key=request_key(f"w{w}-{i}"), adapter=a, rank=ranks[a], prompt_tokens=rng.randint(8, 256),
                             generated_tokens=rng.randint(0, 128)) for i, a in enumerate(names)]
        fleet.observe(WorkerState(worker_id=f"w{w}", model="m", backend="bgmv", running=loads, adapters=infos,
                                  max_batch_size=64, max_model_len=4096, seq=1), 0.0)
    return fleet


def record_cost_us(workers: int, running: int, decisions: int = 300, seed: int = 0) -> dict[str, float | None]:
    """Wall time of one ``DecisionLog.record`` (snapshot, JSON, line write to a temporary file) with
    ``workers`` candidates each running ``running`` requests of mixed ranks."""
    rng = random.Random(seed)
    ranks = {f"a{r}-{i}": r for r in (8, 16, 32, 64) for i in range(4)}
    records = _synthetic_fleet(workers, running, ranks, rng).live(0.0)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        log = DecisionLog.open(str(Path(tmp) / "log.jsonl"), "bench", make_policy(PolicyConfig(policy="random")))
        for i in range(decisions):
            adapter = rng.choice(list(ranks))
            request = PolicyRequest(ranks[adapter], rng.randint(8, 256), adapter)
            started = time.perf_counter()
            log.record(f"r{i}", 0, request, records, (), "w0", 0.0, 1e-5)
            times.append(time.perf_counter() - started)
        log.close()
    return percentiles(times, 1e6)


def _profile(model: Path, adapter_dir: Path, backend: str, out: Path) -> Path:
    """A small profile of ``model`` over the served adapters' ranks (progress on stderr)."""
    from services.gpu_worker.engine_config import EngineConfig
    from services.gpu_worker.profiling.config import ProfileConfig
    from services.gpu_worker.profiling.profiler import profile
    from shared.peft_adapter import read_adapter_config

    dirs = [p for p in adapter_dir.iterdir() if p.is_dir()]
    ranks = tuple(sorted({int(read_adapter_config(p.name, p)["r"]) for p in dirs}))
    config = ProfileConfig(batch_sizes=(1, 2, 4, 8, 16), ranks=ranks, mixed_draws=1, decode_steps=3,
                           prompt_min=8, prompt_max=64)
    profile(model, EngineConfig(backend=backend, device="cpu"), config,
            lambda stage, done, total: print(f"profile {stage} {done}/{total}", file=sys.stderr)).save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="base model dir (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter-dir", type=Path, default=None, help="adapter root (default: the demo adapters)")
    parser.add_argument("--profile", type=Path, default=None, help="profile JSON (default: measure a small one)")
    parser.add_argument("--backend", default="bgmv", choices=BACKENDS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULTS / "live_routing-cpu.json")
    add_arguments(parser, LiveWorkload)
    args = parser.parse_args(argv)
    from launcher.demo_adapters import ensure_demo_adapters
    from shared.model_store import default_model_dir

    model = args.model or default_model_dir()
    adapter_dir = args.adapter_dir or ensure_demo_adapters(model)
    run_dir = Path(tempfile.mkdtemp(prefix="caraserve-live-routing-"))
    profile = args.profile or _profile(model, adapter_dir, args.backend, run_dir / "profile.json")
    workload = from_namespace(LiveWorkload, args)
    config = live_stack_config(model, adapter_dir, profile, run_dir, args.workers, backend=args.backend,
                               ready_timeout_s=300)
    load_before = os.getloadavg()[0]
    run = run_live(config, workload, timeout_s=300)
    result = {"bench": "live_routing", "device": "cpu", "cores": os.cpu_count(), "python": platform.python_version(),
              "loadavg_1m_before_after": [load_before, os.getloadavg()[0]], "model": model.name,
              "backend": args.backend, "workers": args.workers, "policy": "rank_aware", "profile": str(profile),
              "workload": dataclasses.asdict(workload), "run_dir": str(run_dir),
              **report(run, run.header.make_policy()),
              "log_record_us": {"2x8": record_cost_us(2, 8), "64x32": record_cost_us(64, 32)}}
    text = json.dumps(result, indent=1)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(text + "\n")
    return 0 if result["decisions_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
