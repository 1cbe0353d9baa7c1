"""How one host's cores are shared between a gpu_worker and its CPU prefill pool.

The pool takes the last ``pool_workers`` cores, one process each; the worker keeps the others
for its own threads (the base GEMMs on a CPU-only host, the launch thread on a GPU host), so
the two never time-slice one core. With too few cores to split, both keep every core.
"""

from __future__ import annotations

import os


def host_cores() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0))


def pool_cores(pool_workers: int, cores: list[int]) -> list[int]:
    """One core per pool process, from the last core down (wrapping when there are fewer cores)."""
    return [cores[-(i % len(cores)) - 1] for i in range(pool_workers)]


def worker_cores(pool_workers: int, cores: list[int]) -> list[int]:
    """The cores the worker keeps: all but the pool's, or all of them when nothing would be left."""
    rest = [c for c in cores if c not in set(pool_cores(pool_workers, cores))]
    return rest or list(cores)
