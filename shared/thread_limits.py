"""Keeps torch's OpenMP thread pool to the one team that serves the step loop.

A torch op big enough to run in parallel starts an OpenMP thread team for the Python thread
that called it, and the team lives as long as that thread does. Once libgomp manages more
threads than there are cores, it drops its spin-wait between parallel regions from about
300,000 spins to 1,000: the step loop's threads then fall asleep between every two ops and
pay a futex wake-up at the next one. On the 2-core CI machine one idle adapter-loader team
cost the mixed-LoRA engine bench 9 % of its throughput and 0.4 of its 2 cores
(``docs/engine_performance.md``).

* Helper threads (adapter loads, host warming, the event loop's executor) call
  :func:`run_torch_serially` first: OpenMP's thread count is a per-thread setting, so their
  own torch ops run on the calling thread alone and start no team. Calls into MKL (its vector
  math, as ``torch.sin`` uses, and float32 BLAS) keep MKL's process-wide thread count; the
  helpers make none (an adapter load copies, casts, transposes and scales).
* Work that should use every core once (building the engine) runs in
  :func:`run_in_passing_thread`, whose thread, and with it its team, ends with the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from threadpoolctl import threadpool_limits

T = TypeVar("T")


def run_torch_serially() -> None:
    """Make torch's CPU ops run single-threaded in the calling thread, for the thread's lifetime."""
    # torch sets a thread's OpenMP thread count from its global setting on that thread's first
    # parallel op; ask for it now, so that this first op cannot undo the limit below
    torch.get_num_threads()
    threadpool_limits(limits=1, user_api="openmp")


def serial_executor(name: str) -> ThreadPoolExecutor:
    """A thread pool whose threads run torch serially (an event loop's default executor)."""
    return ThreadPoolExecutor(thread_name_prefix=name, initializer=run_torch_serially)


async def run_in_passing_thread(fn: Callable[[], T], name: str) -> T:
    """``fn()`` on a thread of its own that ends when ``fn`` returns, without blocking the event loop."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)
    finally:
        pool.shutdown(wait=False)
