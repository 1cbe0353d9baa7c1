"""Cancelling mid-stream frees the request's KV blocks on its worker (seen in ``state.<id>``).

Two ways to cancel: an HTTP client that disconnects (the official openai client closing its
stream), and ``caraserve.v1.cancel``. The worker must abort the request well before its
natural end: its ``worker.decode`` span says ``cancelled`` after far fewer tokens than asked.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from shared import subjects
from shared.schemas import CancelRequest, GenerateRequest
from shared.schemas.names import request_key
from tests.e2e.clients import StateWatch, all_blocks_free, model_names, openai_client, send
from tests.service.rotel import RotelCollector, SpanRecord

pytestmark = pytest.mark.timeout(120)

MAX_TOKENS = 450
FREED_WITHIN_S = 3.0


def abandon_stream(http_url: str, model: str) -> str:
    """Start a long streamed completion, read its first event, disconnect; the request id."""
    stream = openai_client(http_url).completions.create(
        model=model, prompt="Autumn brings rain and wind", max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    request_id = next(iter(stream)).id
    stream.close()
    return request_id


async def span_of(collector: RotelCollector, request_id: str, name: str, worker_id: str | None = None) -> SpanRecord:
    """The ``name`` span of ``request_id`` (on ``worker_id``, when given), waiting for the collector."""
    deadline = time.monotonic() + 60
    while True:
        found = [s for s in collector.spans() if s.name == name and s.attributes.get("request.id") == request_id
                 and (worker_id is None or s.attributes.get("worker.id") == worker_id)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {name} span for {request_id}"
        await asyncio.sleep(0.1)


async def assert_freed_by_cancel(watch: StateWatch, collector: RotelCollector, request_id: str) -> None:
    """The request's blocks were in use and are free, and the worker that served it stopped early.

    The serving worker is the one the gateway relayed from: on a loaded host a worker may ack a
    submit too late, and then the scheduler cancels it there and places the request elsewhere.
    """
    await watch.wait_for(all_blocks_free, FREED_WITHIN_S)
    served_by = (await span_of(collector, request_id, "gateway.request")).attributes["worker.id"]
    decode = await span_of(collector, request_id, "worker.decode", served_by)
    assert decode.attributes["finish_reason"] == "cancelled", decode.attributes
    assert 0 < int(decode.attributes["completion_tokens"]) < MAX_TOKENS, decode.attributes
    assert served_by in watch.held_by.get(request_key(request_id), set()), watch.held_by
    assert watch.blocks_in_use[request_key(request_id)] > 0, "no state showed the request's KV blocks in use"


async def test_http_disconnect_frees_the_kv_blocks(e2e_stack, nats_client, e2e_collector):
    base, _ = model_names(e2e_stack.http_url)
    watch = await StateWatch().start(nats_client)
    await watch.wait_for(all_blocks_free, 5)
    request_id = await asyncio.to_thread(abandon_stream, e2e_stack.http_url, base)
    await assert_freed_by_cancel(watch, e2e_collector, request_id)


async def test_nats_cancel_frees_the_kv_blocks(e2e_stack, nats_client, e2e_collector):
    _, adapters = model_names(e2e_stack.http_url)
    watch = await StateWatch().start(nats_client)
    await watch.wait_for(all_blocks_free, 5)
    request_id = "e2e-nats-cancel"
    stream = await send(nats_client, GenerateRequest(model=adapters[0], prompt="In winter the lakes freeze",
                                                     max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                                                     request_id=request_id))
    deadline = time.monotonic() + 60  # the first token; generous for a loaded 2-core box
    while not stream.token_ids:
        assert time.monotonic() < deadline and not stream.done.is_set(), stream.chunks
        await asyncio.sleep(0.001)
    await nats_client.publish(subjects.CANCEL, CancelRequest(request_id=request_id,
                                                             cancel_token=stream.chunks[0].cancel_token))
    await asyncio.wait_for(stream.done.wait(), FREED_WITHIN_S)
    assert stream.final.finish_reason == "cancelled" and len(stream.token_ids) < MAX_TOKENS
    await assert_freed_by_cancel(watch, e2e_collector, request_id)
