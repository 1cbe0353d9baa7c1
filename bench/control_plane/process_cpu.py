"""CPU time spent by each process of a running LocalStack (and the benchmark itself), for per-request costs.

Wall-clock latency on a small shared machine depends on what else runs; the CPU each process
burns per request does much less, so the benchmark reports both.
"""

from __future__ import annotations

import os

import psutil


def stack_processes(procs: dict[str, "object"]) -> dict[str, psutil.Process]:
    """The stack's service processes by name, plus its nats-server and this process ("client")."""
    out = {name: psutil.Process(proc.pid) for name, proc in procs.items()}  # type: ignore[attr-defined]
    me = psutil.Process(os.getpid())
    for child in me.children():
        if child.name() == "nats-server":
            out["nats-server"] = child
    out["client"] = me
    return out


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """User + system CPU seconds used so far by each process (all its threads)."""
    out = {}
    for name, process in processes.items():
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[name] = times.user + times.system
    return out


def per_request_ms(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """CPU milliseconds per request of each process between two snapshots."""
    return {name: round((after[name] - before[name]) * 1000.0 / max(requests, 1), 3)
            for name in sorted(after) if name in before}
