"""The gateway against a real nats-server, the real scheduler and fake-but-real workers."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgpack
import pytest

from shared import subjects
from shared.schemas import AdapterInfo, CancelRequest, Chunk, GenerateRequest
from tests.service.fake_worker import token_for
from tests.service.helpers import client, make_adapter_dir, start_gateway, start_scheduler, start_worker, wait_until

pytestmark = pytest.mark.timeout(60)

ADAPTERS = {"sql": 8, "poems": 16}
WORKER_ADAPTERS = [AdapterInfo(name=name, rank=rank, level="host") for name, rank in ADAPTERS.items()]


@pytest.fixture
def adapter_dir(tmp_path):
    return make_adapter_dir(tmp_path / "adapters", ADAPTERS)


@pytest.fixture
async def stack_with_gateway(nats_server, stack, tiny_model_dir, adapter_dir):
    """Scheduler + gateway; tests add workers. Returns (gateway, http base URL)."""
    async def make(**gateway_overrides):
        await start_scheduler(stack, nats_server.url)
        gateway = await start_gateway(stack, nats_server.url, tiny_model_dir, adapter_dir=str(adapter_dir),
                                      **gateway_overrides)
        return gateway, f"http://127.0.0.1:{gateway.http_port}"
    return make


async def add_worker(stack, nats_server, gateway, worker_id="w0", **kwargs):
    worker = await start_worker(stack, nats_server.url, worker_id, model=gateway.model_name,
                                adapters=WORKER_ADAPTERS, **kwargs)
    await wait_until(lambda: worker_id in gateway.fleet.live_workers())
    return worker


async def nats_generate(bus, request: GenerateRequest | bytes, limit_s: float = 5.0) -> list[Chunk]:
    """Publish a generate request and collect chunks until the final one (then check nothing follows)."""
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    payload = request if isinstance(request, bytes) else request.encode()
    await bus.nc.publish(subjects.GENERATE, payload, reply=inbox)
    chunks = []
    while not chunks or not chunks[-1].final:
        chunks.append(Chunk.decode((await sub.next_msg(timeout=limit_s)).data))
    with pytest.raises(asyncio.TimeoutError):
        await sub.next_msg(timeout=0.15)  # exactly one final chunk: nothing after it
    await sub.unsubscribe()
    return chunks


async def test_nats_api_streams_chunks_and_exactly_one_final(nats_server, stack, stack_with_gateway):
    gateway, _ = await stack_with_gateway()
    worker = await add_worker(stack, nats_server, gateway)
    bus = await client(stack, nats_server.url)
    chunks = await nats_generate(bus, GenerateRequest(model="sql", prompt="hello world", max_tokens=5,
                                                      request_id="nats-1"))
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert [c.final for c in chunks].count(True) == 1 and chunks[-1].finish_reason == "length"
    assert sum(len(c.token_ids) for c in chunks) == 5 and {c.request_id for c in chunks} == {"nats-1"}
    prompt_len = len(worker.submits[0].prompt_token_ids)
    assert chunks[-1].usage.prompt_tokens == prompt_len and chunks[-1].usage.completion_tokens == 5
    assert worker.submits[0].adapter == "sql" and worker.submits[0].sampling.max_tokens == 5

    whole = await nats_generate(bus, GenerateRequest(model=gateway.model_name, prompt=[5, 6, 7], max_tokens=3,
                                                     stream=False))
    assert len(whole) == 1 and whole[0].token_ids == [token_for(3), token_for(4), token_for(5)]
    assert whole[0].text == "".join(f" t{token_for(n)}" for n in (3, 4, 5))


async def test_nats_api_answers_bad_requests_with_one_typed_error_chunk(nats_server, stack, stack_with_gateway):
    gateway, _ = await stack_with_gateway()
    await add_worker(stack, nats_server, gateway)
    bus = await client(stack, nats_server.url)
    cases = [
        (b"\x93\x01\x02", "bad_payload"),
        (msgpack.packb({"v": 99, "model": "sql", "prompt": "x"}), "unsupported_version"),
        (msgpack.packb({"v": 1, "model": "sql", "prompt": "x", "temperature": "hot", "request_id": "r-7"}),
         "bad_payload"),
        (GenerateRequest(model="missing", prompt="x", request_id="r-8").encode(), "model_not_found"),
        (GenerateRequest(model="sql", prompt="", request_id="r-9").encode(), "invalid_request"),
    ]
    for payload, code in cases:
        chunks = await nats_generate(bus, payload)
        assert len(chunks) == 1 and chunks[0].finish_reason == "error" and chunks[0].error.code == code
    assert chunks[0].request_id == "r-9"
    assert (await nats_generate(bus, GenerateRequest(model="sql", prompt="fine", max_tokens=2)))[-1].finish_reason \
        == "length"  # still serving


async def test_nats_cancel_stops_the_worker_and_ends_with_cancelled(nats_server, stack, stack_with_gateway):
    gateway, _ = await stack_with_gateway()
    worker = await add_worker(stack, nats_server, gateway, step_s=0.05)
    bus = await client(stack, nats_server.url)
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    await bus.nc.publish(subjects.GENERATE, GenerateRequest(model="sql", prompt="a long story", max_tokens=200,
                                                            request_id="to-cancel").encode(), reply=inbox)
    first = Chunk.decode((await sub.next_msg(timeout=5)).data)
    assert not first.final and "to-cancel" in worker.running_ids
    await bus.publish(subjects.CANCEL, CancelRequest(request_id="to-cancel", cancel_token=first.cancel_token))
    chunks = [first]
    while not chunks[-1].final:
        chunks.append(Chunk.decode((await sub.next_msg(timeout=5)).data))
    assert chunks[-1].finish_reason == "cancelled" and len(chunks) < 50
    await wait_until(lambda: worker.cancels == ["to-cancel"])
    assert "to-cancel" not in worker.running_ids  # the worker freed the request
    assert not gateway.relay.active and gateway.relay.limiter.count == 0


async def test_http_completions_and_chat_with_the_openai_client(nats_server, stack, stack_with_gateway):
    import openai

    gateway, base = await stack_with_gateway()
    await add_worker(stack, nats_server, gateway)
    api = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    stack.push_async_callback(api.close)
    done = await api.completions.create(model="poems", prompt="Roses are", max_tokens=4)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 4
    assert done.choices[0].text.count(" t") == 4
    pieces = [c async for c in await api.chat.completions.create(
        model=gateway.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True,
        stream_options={"include_usage": True})]
    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text.count(" t") == 3 and pieces[0].choices[0].delta.role == "assistant"
    assert pieces[-2].choices[0].finish_reason == "length" and pieces[-1].usage.completion_tokens == 3
    models = await api.models.list()
    by_id = {m.id: m for m in models.data}
    assert set(by_id) == {gateway.model_name, "sql", "poems"}
    assert by_id["sql"].parent == gateway.model_name and by_id[gateway.model_name].parent is None


async def test_http_validation_errors(nats_server, stack, stack_with_gateway):
    gateway, base = await stack_with_gateway(max_model_len=64)
    await add_worker(stack, nats_server, gateway)
    cases = [
        ({"model": "nope", "prompt": "x"}, 404, "model_not_found"),
        ({"model": "sql", "prompt": ""}, 400, "invalid_request"),
        ({"model": "sql", "prompt": "word " * 200}, 400, "context_length_exceeded"),
        ({"model": "sql", "prompt": "hello", "max_tokens": 64}, 400, "context_length_exceeded"),
        ({"model": "sql", "prompt": "hello", "n": 2}, 400, "invalid_request"),
        ({"model": "sql", "prompt": "hello", "temperature": -1}, 400, "invalid_request"),
        ({"model": "sql", "prompt": [1, 99999]}, 400, "invalid_request"),
    ]
    async with aiohttp.ClientSession() as http:
        for body, status, code in cases:
            async with http.post(f"{base}/v1/completions", json=body) as response:
                assert response.status == status, body
                assert (await response.json())["error"]["code"] == code
        async with http.post(f"{base}/v1/completions", data=b"{not json") as response:
            assert response.status == 400
        async with http.post(f"{base}/v1/completions", json={"model": "sql", "prompt": "hello", "max_tokens": 8}) \
                as response:
            assert response.status == 200
        async with http.post(f"{base}/v1/chat/completions",
                             json={"model": "sql", "messages": [{"role": "user", "content": "hi"}]}) as response:
            body = await response.json()  # no max_tokens: the rest of the context
            assert response.status == 200 and body["usage"]["total_tokens"] == 64
        async with http.get(f"{base}/health") as response:
            assert response.status == 200 and (await response.json())["workers"] == ["w0"]


async def test_past_max_inflight_requests_get_429_at_once(nats_server, stack, stack_with_gateway):
    gateway, base = await stack_with_gateway(max_inflight=1)
    await add_worker(stack, nats_server, gateway, step_s=0.05)
    async with aiohttp.ClientSession() as http:
        slow = await http.post(f"{base}/v1/completions", json={"model": "sql", "prompt": "x", "max_tokens": 40,
                                                               "stream": True})
        await slow.content.readline()  # the first event: the slot is taken
        started = time.monotonic()
        async with http.post(f"{base}/v1/completions", json={"model": "sql", "prompt": "x"}) as response:
            assert response.status == 429 and (await response.json())["error"]["code"] == "overloaded"
        assert time.monotonic() - started < 0.5
        slow.close()
    await wait_until(lambda: gateway.relay.limiter.count == 0)


async def test_auth_and_tenancy(nats_server, stack, stack_with_gateway):
    gateway, base = await stack_with_gateway(api_keys=("key-a:alice", "key-b:bob"),
                                             tenant_adapters=("alice:sql", "bob:*"))
    await add_worker(stack, nats_server, gateway)

    async def post(key, model):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with http.post(f"{base}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1},
                             headers=headers) as response:
            return response.status, await response.json()

    async with aiohttp.ClientSession() as http:
        assert (await post(None, "sql"))[0] == 401
        status, body = await post("wrong", "sql")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert (await post("key-a", "sql"))[0] == 200
        assert (await post("key-a", "poems"))[0] == 404  # not alice's adapter
        assert (await post("key-a", gateway.model_name))[0] == 200  # the base model is always allowed
        assert (await post("key-b", "poems"))[0] == 200
        async with http.get(f"{base}/v1/models", headers={"Authorization": "Bearer key-a"}) as response:
            assert {m["id"] for m in (await response.json())["data"]} == {gateway.model_name, "sql"}
    bus = await client(stack, nats_server.url)
    denied = await nats_generate(bus, GenerateRequest(model="sql", prompt="x", api_key="wrong"))
    assert denied[0].error.code == "invalid_api_key"
    allowed = await nats_generate(bus, GenerateRequest(model="sql", prompt="x", max_tokens=2, api_key="key-a"))
    assert allowed[-1].finish_reason == "length"


async def test_http_disconnect_cancels_the_request_on_the_worker(nats_server, stack, stack_with_gateway):
    gateway, base = await stack_with_gateway()
    worker = await add_worker(stack, nats_server, gateway, step_s=0.05)
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{base}/v1/completions", json={"model": "sql", "prompt": "x", "max_tokens": 200,
                                                                   "stream": True})
        assert (await response.content.readline()).startswith(b"data: ")
        request_id = worker.submits[0].request_id
        assert request_id in worker.running_ids
        response.close()  # the client goes away mid-stream
    await wait_until(lambda: worker.cancels == [request_id], timeout_s=3)
    assert not worker.running_ids
    await wait_until(lambda: not gateway.relay.active)


async def test_worker_lost_mid_stream_is_rerouted_with_the_generated_tokens(nats_server, stack, stack_with_gateway):
    gateway, _ = await stack_with_gateway(worker_timeout_s=0.5)
    doomed = await add_worker(stack, nats_server, gateway, "doomed", step_s=0.05)
    bus = await client(stack, nats_server.url)
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    await bus.nc.publish(subjects.GENERATE, GenerateRequest(model="sql", prompt=[1, 2, 3, 4], max_tokens=12,
                                                            request_id="survivor").encode(), reply=inbox)
    chunks = [Chunk.decode((await sub.next_msg(timeout=5)).data) for _ in range(3)]
    spare = await add_worker(stack, nats_server, gateway, "spare")
    started = time.monotonic()
    await doomed.stop()  # killed mid-stream
    while not chunks[-1].final:
        chunks.append(Chunk.decode((await sub.next_msg(timeout=5)).data))
    assert time.monotonic() - started < 5.0
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == [token_for(4 + i) for i in range(12)]  # identical to an uninterrupted run
    assert [c.index for c in chunks] == list(range(len(chunks))) and chunks[-1].finish_reason == "length"
    resubmit = spare.submits[0]
    assert resubmit.attempt == 1 and resubmit.prompt_token_ids == [1, 2, 3, 4]
    assert resubmit.generated_token_ids == tokens[:len(resubmit.generated_token_ids)]
    assert len(resubmit.generated_token_ids) >= 3


async def test_chunks_of_a_submit_the_scheduler_gave_up_on_are_dropped(nats_server, stack, tiny_model_dir,
                                                                        adapter_dir):
    """A worker too busy to ack in time already streams; the scheduler cancels it and routes elsewhere."""
    await start_scheduler(stack, nats_server.url, submit_timeout_s=0.3)
    gateway = await start_gateway(stack, nats_server.url, tiny_model_dir, adapter_dir=str(adapter_dir))
    busy = await add_worker(stack, nats_server, gateway, "busy", mode="late", ack_delay_s=2.0, step_s=0.01)
    bus = await client(stack, nats_server.url)
    pending = asyncio.ensure_future(nats_generate(bus, GenerateRequest(model="sql", prompt=[1, 2, 3, 4], max_tokens=40,
                                                                       request_id="late-ack"), limit_s=10))
    await wait_until(lambda: busy.submits)
    spare = await add_worker(stack, nats_server, gateway, "spare")
    chunks = await pending
    assert busy.cancels == ["late-ack"] and spare.submits[0].request_id == "late-ack"
    assert all(c.worker_id in (None, "spare") for c in chunks), [c.worker_id for c in chunks]
    tokens = [t for c in chunks for t in c.token_ids]
    assert tokens == [token_for(4 + i) for i in range(40)]  # none of the busy worker's tokens
    assert [c.index for c in chunks] == list(range(len(chunks))) and chunks[-1].finish_reason == "length"


async def test_a_silent_worker_is_told_to_cancel_when_its_request_moves_on(nats_server, stack, stack_with_gateway):
    gateway, _ = await stack_with_gateway(stall_timeout_s=0.5)
    silent = await add_worker(stack, nats_server, gateway, "silent", mode="stall")
    bus = await client(stack, nats_server.url)
    pending = asyncio.ensure_future(nats_generate(bus, GenerateRequest(model="sql", prompt=[1, 2], max_tokens=5,
                                                                       request_id="moved-on"), limit_s=10))
    await wait_until(lambda: silent.submits)
    await add_worker(stack, nats_server, gateway, "spare")
    chunks = await pending
    assert [t for c in chunks for t in c.token_ids] == [token_for(2 + i) for i in range(5)]
    await wait_until(lambda: silent.cancels == ["moved-on"] and not silent.running_ids)


async def test_a_stream_waiting_for_its_next_chunk_ends_stream_interrupted_after_a_nats_restart(
        nats_server, stack, stack_with_gateway):
    """nats-server restarts while a NATS stream waits for its worker's next chunk (the worker is silent,
    as one whose last chunks were lost in the outage): the gateway ends the stream with
    stream_interrupted soon after its reconnect rather than when, if ever, another chunk comes."""
    gateway, _ = await stack_with_gateway()
    silent = await add_worker(stack, nats_server, gateway, "silent", mode="stall")
    bus = await client(stack, nats_server.url)
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    request = GenerateRequest(model="sql", prompt=[1, 2], max_tokens=5, request_id="cut-off")
    await bus.nc.publish(subjects.GENERATE, request.encode(), reply=inbox)
    await wait_until(lambda: silent.submits)
    restarted = time.monotonic()
    nats_server.restart()
    final = Chunk.decode((await sub.next_msg(timeout=8)).data)
    assert final.final and final.index == 0 and final.error.code == "stream_interrupted", final
    assert time.monotonic() - restarted < 5.0
    await wait_until(lambda: silent.cancels == ["cut-off"])  # and the worker was told to stop


async def test_worker_lost_with_no_other_worker_ends_with_an_error_within_5s(nats_server, stack, stack_with_gateway):
    gateway, base = await stack_with_gateway(worker_timeout_s=0.5, route_deadline_ms=500)
    doomed = await add_worker(stack, nats_server, gateway, "doomed", step_s=0.05)
    async with aiohttp.ClientSession() as http:
        response = await http.post(f"{base}/v1/completions", json={"model": "sql", "prompt": "x", "max_tokens": 100,
                                                                   "stream": True})
        await response.content.readline()
        started = time.monotonic()
        await doomed.stop()
        events = [line async for line in response.content if line.strip()]
        assert time.monotonic() - started < 5.0
        assert b'"code":"no_capacity"' in events[-2] or b'"code":"worker_lost"' in events[-2]
        assert events[-1] == b"data: [DONE]\n"
        async with http.post(f"{base}/v1/completions", json={"model": "sql", "prompt": "x"}) as refused:
            assert refused.status == 503 and (await refused.json())["error"]["code"] == "no_capacity"


async def test_adapters_reported_on_worker_states_join_the_catalog(nats_server, stack, stack_with_gateway):
    gateway, base = await stack_with_gateway()
    await add_worker(stack, nats_server, gateway)  # lists sql and poems
    await start_worker(stack, nats_server.url, "w9", model=gateway.model_name,
                       adapters=[AdapterInfo(name="legal", rank=32, level="disk")])
    await wait_until(lambda: "w9" in gateway.fleet.live_workers())
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/v1/models") as response:
            models = {m["id"]: m for m in (await response.json())["data"]}
    assert models["legal"]["parent"] == gateway.model_name and models["legal"]["rank"] == 32
    assert models["legal"]["workers"] == [{"worker": "w9", "level": "disk"}]
    assert {"sql", "poems"} <= set(models)  # the other worker's adapters stay
    assert list(models) == [gateway.model_name, "legal", "poems", "sql"]  # the base model, then by name


async def test_a_gateway_shutting_down_finishes_its_streams_first(nats_server, stack, tiny_model_dir, adapter_dir):
    import contextlib

    await start_scheduler(stack, nats_server.url)
    bus = await client(stack, nats_server.url)
    async with contextlib.AsyncExitStack() as gateway_stack:
        gateway = await start_gateway(gateway_stack, nats_server.url, tiny_model_dir, adapter_dir=str(adapter_dir),
                                      grace_s=5.0)
        await add_worker(stack, nats_server, gateway, step_s=0.02)
        inbox = bus.nc.new_inbox()
        sub = await bus.nc.subscribe(inbox)
        await bus.nc.publish(subjects.GENERATE, GenerateRequest(model="sql", prompt="x", max_tokens=20).encode(),
                             reply=inbox)
        chunks = [Chunk.decode((await sub.next_msg(timeout=5)).data)]
    # the gateway is gone now, after its in-flight request ended
    while not chunks[-1].final:
        chunks.append(Chunk.decode((await sub.next_msg(timeout=1)).data))
    assert chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == 20


async def test_a_request_queued_past_the_old_stall_timeout_still_completes(nats_server, stack, stack_with_gateway):
    """Liveness is the heartbeat: a request waiting in a live worker's queue (or a long prefill) is not lost."""
    gateway, base = await stack_with_gateway(worker_timeout_s=0.3, missing_grace_s=0.3)
    busy = await add_worker(stack, nats_server, gateway, "busy", queue_s=2.0)
    spare = await add_worker(stack, nats_server, gateway, "spare", queue_s=2.0)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/completions", json={"model": "sql", "prompt": [1, 2], "max_tokens": 4}) \
                as response:
            assert response.status == 200, await response.text()
            body = await response.json()
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 4
    first, second = (busy, spare) if busy.submits else (spare, busy)
    assert len(first.submits) == 1 and not first.cancels and not second.submits  # served where it waited


async def test_a_request_its_worker_silently_dropped_is_rerouted(nats_server, stack, stack_with_gateway):
    """The worker heartbeats but stops listing the request and sends no final chunk (e.g. lost in a reconnect)."""
    gateway, _ = await stack_with_gateway(missing_grace_s=0.3)
    dropper = await add_worker(stack, nats_server, gateway, "dropper", mode="drop", drop_after=3, step_s=0.01)
    bus = await client(stack, nats_server.url)
    pending = asyncio.ensure_future(nats_generate(bus, GenerateRequest(model="sql", prompt=[1, 2, 3], max_tokens=8,
                                                                       request_id="dropped"), limit_s=10))
    await wait_until(lambda: dropper.submits)
    spare = await add_worker(stack, nats_server, gateway, "spare")
    started = time.monotonic()
    chunks = await pending
    assert time.monotonic() - started < 3.0
    assert [t for c in chunks for t in c.token_ids] == [token_for(3 + i) for i in range(8)]
    assert chunks[-1].finish_reason == "length" and spare.submits[0].generated_token_ids == chunks[0].token_ids + \
        [t for c in chunks[1:3] for t in c.token_ids]
    assert dropper.cancels == ["dropped"]


async def test_past_the_fleets_capacity_requests_get_429_at_once(nats_server, stack, stack_with_gateway):
    gateway, base = await stack_with_gateway()  # max_inflight 256, but the one worker holds 2
    await add_worker(stack, nats_server, gateway, max_batch=2, step_s=0.05)
    body = {"model": "sql", "prompt": "x", "max_tokens": 40, "stream": True}
    async with aiohttp.ClientSession() as http:
        slow = [await http.post(f"{base}/v1/completions", json=body) for _ in range(2)]
        for response in slow:
            await response.content.readline()
        async with http.get(f"{base}/health") as response:
            health = await response.json()
        assert (health["capacity"], health["inflight"], health["workers"]) == (2, 2, ["w0"])
        started = time.monotonic()
        async with http.post(f"{base}/v1/completions", json={"model": "sql", "prompt": "x"}) as response:
            assert response.status == 429 and (await response.json())["error"]["code"] == "overloaded"
        assert time.monotonic() - started < 0.5
        for response in slow:
            response.close()
    await wait_until(lambda: gateway.relay.limiter.count == 0)


async def test_health_reports_a_lost_worker_as_degraded_until_it_is_back(nats_server, stack, stack_with_gateway):
    gateway, base = await stack_with_gateway(worker_timeout_s=0.3)
    await add_worker(stack, nats_server, gateway, "w0", max_batch=4)
    doomed = await add_worker(stack, nats_server, gateway, "w1", max_batch=4)

    async def health():
        async with http.get(f"{base}/health") as response:
            return response.status, await response.json()

    async with aiohttp.ClientSession() as http:
        status, body = await health()
        assert status == 200 and body["status"] == "ok" and body["capacity"] == 8 and body["lost_workers"] == []
        await doomed.stop()
        await wait_until(lambda: gateway.fleet.live_workers() == ["w0"])
        status, body = await health()
        assert status == 200 and body["status"] == "degraded" and body["lost_workers"] == ["w1"]
        assert body["capacity"] == 4
        await add_worker(stack, nats_server, gateway, "w1", max_batch=4)  # restarted, same id
        status, body = await health()
        assert body["status"] == "ok" and body["workers"] == ["w0", "w1"] and body["capacity"] == 8


async def test_a_restarted_gateway_ends_the_streams_its_predecessor_left(nats_server, stack, stack_with_gateway,
                                                                       tmp_path):
    """Gateway replica B starting on A's journal (as A's restart would) sends A's NATS client a final
    gateway_restarted chunk, at the next index, and tells the worker to cancel."""
    first, _ = await stack_with_gateway(journal_dir=str(tmp_path))
    worker = await add_worker(stack, nats_server, first, step_s=0.4)
    bus = await client(stack, nats_server.url)
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    await bus.nc.publish(subjects.GENERATE, GenerateRequest(model="sql", prompt="a long story", max_tokens=500,
                                                            request_id="orphan-1").encode(), reply=inbox)
    received = [Chunk.decode((await sub.next_msg(timeout=5)).data)]
    await start_gateway(stack, nats_server.url, first.config.model_dir, journal_dir=str(tmp_path), http_port=-1)
    while not received[-1].final:
        received.append(Chunk.decode((await sub.next_msg(timeout=5)).data))
    final = received[-1]
    assert final.error is not None and final.error.code == "gateway_restarted"
    assert [c.index for c in received] == list(range(len(received)))
    await wait_until(lambda: "orphan-1" in worker.cancels)
