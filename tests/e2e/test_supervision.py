"""The supervised stack heals: a SIGKILLed gpu_worker or nats-server is restarted and serving goes on.

The stack is supervised as ``caraserve up``'s serve loop does it (:meth:`LocalStack.supervise`
every 0.1 s). Greedy requests run once undisturbed (the reference) and once across the fault:

* one of two workers is SIGKILLed with streams in flight: the other worker's streams finish
  untouched, the killed worker's streams are re-routed and still equal the reference, and the
  worker comes back (same id) and is live again;
* nats-server is SIGKILLed with HTTP requests in flight: it is restarted on the same port,
  every in-flight request ends (complete and equal to the reference, or with an error), and
  new requests are served again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from launcher.local_stack import LocalStack
from shared.schemas import GenerateRequest
from shared.schemas.names import request_key
from tests.e2e.clients import StateWatch, model_names, send_all

pytestmark = pytest.mark.timeout(150)  # the stack's start (fixture) included; each test's body stays < 60 s

REQUESTS = 6
MAX_TOKENS = 300
STARTED_TOKENS = 4
BACK_WITHIN_S = 40.0  # a restarted tiny-model worker is live again within this (2 shared cores)
SERVING_WITHIN_S = 15.0


@pytest.fixture
async def supervised(e2e_stack: LocalStack, stack_holder) -> AsyncIterator[LocalStack]:
    """The stack, supervised during the test; the next test gets a fresh one."""
    stack_holder.damage()

    async def loop() -> None:
        while True:
            e2e_stack.supervise()
            await asyncio.sleep(0.1)

    task = asyncio.get_running_loop().create_task(loop())
    yield e2e_stack
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def requests(models: list[str], tag: str) -> list[GenerateRequest]:
    return [GenerateRequest(model=models[i % len(models)], prompt=f"Rivers run down to the sea {i}",
                            max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, request_id=f"sup-{tag}-{i}")
            for i in range(REQUESTS)]


async def health(http: aiohttp.ClientSession, stack: LocalStack) -> dict:
    try:
        async with http.get(f"{stack.http_url}/health", timeout=aiohttp.ClientTimeout(total=2)) as response:
            return await response.json()
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return {}


async def until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


async def test_a_killed_worker_is_restarted_and_the_other_workers_streams_are_untouched(supervised, nats_client):
    stack = supervised
    base, adapters = model_names(stack.http_url)
    models = [base, adapters[0], adapters[1]]
    reference = await send_all(nats_client, requests(models, "ref"))
    await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in reference)), 30)

    watch = await StateWatch().start(nats_client)
    streams = await send_all(nats_client, requests(models, "kill"))
    started = time.monotonic()
    while not all(len(s.token_ids) >= STARTED_TOKENS and request_key(s.request.request_id) in watch.placed
                  for s in streams):
        assert time.monotonic() - started < 20, [len(s.token_ids) for s in streams]
        await asyncio.sleep(0.005)
    holders = {s.request.request_id: watch.placed[request_key(s.request.request_id)] for s in streams}
    # a fast stream can finish while the slowest one starts: the victim is the worker with the most
    # streams still running, and only those count as moved
    running = {s.request.request_id for s in streams if not s.done.is_set()}
    assert running, "every stream finished before the fault"
    victim = collections.Counter(holders[rid] for rid in running).most_common(1)[0][0]
    killed_at = time.monotonic()
    stack.kill(f"gpu_{victim}")
    await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in streams)), 30)

    moved = [s for s in streams if holders[s.request.request_id] == victim and s.request.request_id in running]
    stayed = [s for s in streams if holders[s.request.request_id] != victim]
    assert moved and stayed, holders
    for stream, ref in zip(streams, reference):
        assert sum(c.final for c in stream.chunks) == 1
        assert stream.final.finish_reason == "length", (holders[stream.request.request_id], stream.final)
        assert stream.token_ids == ref.token_ids, f"{stream.request.request_id} diverged from the undisturbed run"
    # every worker process that held each request: a killed worker's request runs again elsewhere,
    # on the other worker or on the victim's restarted process, whichever the scheduler picked
    runs = {s.request.request_id: watch.runs[request_key(s.request.request_id)] for s in streams}
    workers = {rid: sorted(w for w, _ in held) for rid, held in runs.items()}
    assert all(len(runs[s.request.request_id]) == 2 and victim in workers[s.request.request_id]
               for s in moved), runs  # re-routed
    assert all(workers[s.request.request_id] == [holders[s.request.request_id]] for s in stayed), runs

    async with aiohttp.ClientSession() as http:
        async def both_live() -> bool:
            body = await health(http, stack)
            return body.get("status") == "ok" and len(body.get("workers", [])) == 2
        await until(both_live, BACK_WITHIN_S - (time.monotonic() - killed_at), "the killed worker did not come back")
    assert stack.supervisor.restarts(f"gpu_{victim}") == 1
    assert sum(stack.supervisor.restarts(name) for name in stack.services) == 1  # nothing else was touched


async def test_a_killed_nats_server_is_restarted_and_serving_resumes(supervised, nats_client):
    stack = supervised
    base, _ = model_names(stack.http_url)
    port = stack.nats.port
    body = {"model": base, "prompt": "The sea is", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    async with aiohttp.ClientSession() as http:
        async def complete(timeout_s: float = 30) -> tuple[int, dict]:
            async with http.post(f"{stack.http_url}/v1/completions", json=body,
                                 timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
                return response.status, await response.json()

        status, reference = await complete()
        assert status == 200
        in_flight = [asyncio.ensure_future(complete()) for _ in range(4)]
        await until(lambda: _inflight_at_least(http, stack, 4), 10, "the requests never got in flight")
        await asyncio.sleep(0.3)  # tokens are streaming
        killed_at = time.monotonic()
        stack.kill("nats-server")

        for status, answer in await asyncio.wait_for(asyncio.gather(*in_flight), 40):  # none hangs
            if status == 200:
                assert answer["choices"][0]["text"] == reference["choices"][0]["text"]
            else:
                assert answer["error"]["code"] in ("worker_lost", "no_capacity", "timeout"), answer

        async def serving() -> bool:
            try:
                status, answer = await complete(timeout_s=5)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                return False
            return status == 200 and answer["choices"][0]["text"] == reference["choices"][0]["text"]
        await until(serving, SERVING_WITHIN_S, "serving did not resume after nats-server's restart")
        assert time.monotonic() - killed_at < 40
    assert stack.nats.port == port and stack.supervisor.restarts("nats-server") == 1


async def _inflight_at_least(http: aiohttp.ClientSession, stack: LocalStack, count: int) -> bool:
    return (await health(http, stack)).get("inflight", 0) >= count
