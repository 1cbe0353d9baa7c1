"""Background tasks run until their service's exit stack unwinds, then are cancelled and awaited."""

from __future__ import annotations

import asyncio
import contextlib

from shared.background import cancel_and_wait, run_in_background


async def test_a_background_task_is_cancelled_and_awaited_when_the_stack_unwinds():
    ended: list[str] = []

    async def loop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # its cleanup awaits too: the unwind waits for it
            ended.append("cleaned up")

    async with contextlib.AsyncExitStack() as stack:
        task = run_in_background(stack, loop(), "loop")
        await asyncio.sleep(0)
        assert not task.done() and task.get_name() == "loop"
    assert task.cancelled() and ended == ["cleaned up"]


async def test_cancel_and_wait_accepts_a_task_that_already_ended():
    task = asyncio.get_running_loop().create_task(asyncio.sleep(0))
    await task
    await cancel_and_wait(task)
    assert task.done() and not task.cancelled()
