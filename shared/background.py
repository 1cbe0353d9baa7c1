"""Background tasks a service runs for its whole life, and how they are stopped.

Every service starts a few loops (heartbeats, state publishing, sweeps) that run until its
AsyncExitStack unwinds. :func:`run_in_background` starts one and registers its stop on the
stack; :func:`cancel_and_wait` is that stop, for any task: cancel it and wait until it ended,
so nothing it does outlives the cleanup that follows. Any service may import this.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any


async def cancel_and_wait(task: asyncio.Task) -> None:
    """Cancel ``task`` and wait until it has ended (its CancelledError is the expected outcome)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def run_in_background(stack: contextlib.AsyncExitStack, coro: Coroutine[Any, Any, Any],
                      name: str | None = None) -> asyncio.Task:
    """Run ``coro`` as a task until ``stack`` unwinds, then cancel it and wait for it."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    stack.push_async_callback(cancel_and_wait, task)
    return task
