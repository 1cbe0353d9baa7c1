"""Helper threads start no OpenMP team; a passing thread's team ends with it."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch

from shared.thread_limits import run_in_passing_thread, run_torch_serially, serial_executor

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                                reason="counts this process's threads (Linux) and needs 2 cores")


@pytest.fixture(autouse=True)
def two_torch_threads():
    """torch's global thread count (which new threads start from) at 2, whatever earlier tests left."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _parallel_op() -> torch.Tensor:
    # what an adapter load does (copies, scaling), far above torch's grain size; not an MKL call
    # (torch.sin, say): MKL keeps its own process-wide thread count (see shared/thread_limits.py)
    return (torch.randn(2048, 2048) * 3).t().contiguous()


def _in_thread(serial: bool) -> tuple[int, int]:
    """(torch threads seen, OS threads added) by a thread that runs a parallel op and stays alive."""
    seen, added, done, leave = [], [], threading.Event(), threading.Event()

    def body() -> None:
        if serial:
            run_torch_serially()
        before = _threads()
        _parallel_op()
        seen.append(torch.get_num_threads())
        added.append(len(_threads() - before))  # threads started meanwhile (others may end)
        done.set()
        leave.wait()

    thread = threading.Thread(target=body)
    thread.start()
    done.wait()
    leave.set()
    thread.join()
    return seen[0], added[0]


def test_a_plain_helper_thread_starts_a_team():
    # the failure mode this module exists for: the thread keeps a team of its own
    threads, added = _in_thread(serial=False)
    assert threads >= 2 and added >= 1


def test_a_serial_helper_thread_starts_none_and_leaves_other_threads_alone():
    main = torch.get_num_threads()
    threads, added = _in_thread(serial=True)
    assert (threads, added) == (1, 0)
    assert torch.get_num_threads() == main


def test_serial_executor_threads_run_torch_serially():
    with serial_executor("test") as pool:
        assert pool.submit(lambda: (_parallel_op(), torch.get_num_threads())[1]).result() == 1


async def test_a_passing_thread_ends_with_its_work():
    before = _threads()

    def build() -> int:
        _parallel_op()
        return torch.get_num_threads()

    assert await run_in_passing_thread(build, "test-build") >= 2
    for _ in range(100):
        if not _threads() - before:
            break
        await asyncio.sleep(0.02)
    assert not _threads() - before
