"""A gpu_worker SIGKILLed mid-stream: its requests finish elsewhere, or end with an error within 5 s.

The same greedy requests run twice: once undisturbed (the reference), once while the worker
holding most of them is killed. A request re-routed after the loss is prefilled again with
its prompt plus the tokens it already streamed, so its whole output must equal the
reference; otherwise it must get a terminal error within 5 s of the kill. None may hang.
"""

from __future__ import annotations

import asyncio
import collections
import time

import pytest

from shared.schemas import GenerateRequest
from shared.schemas.names import request_key
from tests.e2e.clients import NatsStream, StateWatch, model_names, send_all

pytestmark = pytest.mark.timeout(120)

REQUESTS = 6
MAX_TOKENS = 400
ERROR_DEADLINE_S = 5.0
STARTED_TOKENS = 4


def requests(model_names_: list[str], tag: str) -> list[GenerateRequest]:
    return [GenerateRequest(model=model_names_[i % len(model_names_)], prompt=f"Rivers run down to the sea {i}",
                            max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, request_id=f"e2e-{tag}-{i}")
            for i in range(REQUESTS)]


def started(streams: list[NatsStream], watch: StateWatch) -> bool:
    """Every request streamed a few tokens and sits on a worker."""
    return all((len(s.token_ids) >= STARTED_TOKENS or s.done.is_set())
               and request_key(s.request.request_id) in watch.placed for s in streams)


async def test_killed_worker_requests_complete_elsewhere_or_fail_fast(e2e_stack, stack_holder, nats_client):
    base, adapters = model_names(e2e_stack.http_url)
    models = [base, adapters[0], adapters[1]]
    reference = await send_all(nats_client, requests(models, "ref"))
    await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in reference)), 60)
    assert all(len(s.token_ids) == MAX_TOKENS for s in reference)

    watch = await StateWatch().start(nats_client)
    streams = await send_all(nats_client, requests(models, "loss"))
    deadline = time.monotonic() + 30
    while not started(streams, watch):
        assert time.monotonic() < deadline, [len(s.token_ids) for s in streams]
        await asyncio.sleep(0.005)
    holders = {s.request.request_id: watch.placed[request_key(s.request.request_id)] for s in streams}
    unfinished = {s.request.request_id for s in streams if not s.done.is_set()}
    victim = collections.Counter(holders[r] for r in unfinished).most_common(1)[0][0]
    stack_holder.damage()
    e2e_stack.kill(f"gpu_{victim}")
    killed_at = time.monotonic()

    await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in streams)), 30)  # none hangs

    interrupted = [i for i, s in enumerate(streams)
                   if holders[s.request.request_id] == victim and s.request.request_id in unfinished]
    assert interrupted, "the killed worker held no unfinished request: the test proved nothing"
    for i, stream in enumerate(streams):
        final = stream.final
        assert sum(c.final for c in stream.chunks) == 1
        assert [c.index for c in stream.chunks] == list(range(len(stream.chunks)))
        if i in interrupted and final.finish_reason == "error":
            assert final.error.code == "worker_lost"
            assert stream.arrivals[-1] - killed_at <= ERROR_DEADLINE_S
            continue
        assert final.finish_reason == "length", (i, final)
        assert stream.token_ids == reference[i].token_ids, f"request {i} diverged from the undisturbed run"
        assert stream.text == reference[i].text
        assert final.usage.completion_tokens == MAX_TOKENS
