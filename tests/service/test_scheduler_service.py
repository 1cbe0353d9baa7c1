"""The scheduler service against a real nats-server and fake-but-real worker state publishers."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.scheduler.service import SchedulerService
from shared import subjects
from shared.schemas import AdapterInfo, Chunk, ErrorReply, RemoteError, RouteReply, RouteRequest, Sampling, WorkerState
from shared.schemas.names import request_key
from tests.service.helpers import client, start_scheduler, start_worker, wait_until

pytestmark = pytest.mark.timeout(30)


def route_request(n: int, inbox: str, adapter: str | None = None, deadline_ms: int = 2000,
                  model: str = "tiny", max_tokens: int = 4) -> RouteRequest:
    return RouteRequest(request_id=f"req-{n}", model=model, adapter=adapter, prompt_token_ids=[1, 2, 3],
                        sampling=Sampling(max_tokens=max_tokens), reply_inbox=inbox, deadline_ms=deadline_ms)


async def wait_for_workers(service: SchedulerService, count: int) -> None:
    await wait_until(lambda: len(service.fleet.live(service.clock())) >= count)


async def test_routes_to_a_live_worker_and_streams_from_it(nats_server, stack):
    scheduler = await start_scheduler(stack, nats_server.url)
    worker = await start_worker(stack, nats_server.url, "w0")
    await wait_for_workers(scheduler, 1)
    bus = await client(stack, nats_server.url)
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    reply = await bus.request(subjects.ROUTE, route_request(1, inbox), RouteReply, timeout=2)
    assert reply.worker_id == "w0" and reply.request_id == "req-1"
    assert [s.request_id for s in worker.submits] == ["req-1"]
    assert worker.submits[0].worker_id == "w0" and worker.submits[0].prompt_token_ids == [1, 2, 3]
    chunks = [Chunk.decode((await sub.next_msg(timeout=2)).data) for _ in range(4)]
    assert [c.index for c in chunks] == [0, 1, 2, 3] and chunks[-1].finish_reason == "length"


async def test_least_loaded_counts_just_routed_requests_no_herding(nats_server, stack):
    scheduler = await start_scheduler(stack, nats_server.url)
    # States only every 10 s: every routing decision below happens before a state shows it.
    workers = [await start_worker(stack, nats_server.url, f"w{i}", state_interval_s=10.0, mode="stall")
               for i in range(2)]
    await wait_for_workers(scheduler, 2)
    bus = await client(stack, nats_server.url)
    for n in range(6):
        await bus.request(subjects.ROUTE, route_request(n, "_INBOX.unused"), RouteReply, timeout=2)
    assert sorted(len(w.submits) for w in workers) == [3, 3]


async def test_pending_routes_settle_when_the_state_shows_them(nats_server, stack):
    scheduler = await start_scheduler(stack, nats_server.url)
    worker = await start_worker(stack, nats_server.url, "w0", state_interval_s=10.0, mode="stall")
    await wait_for_workers(scheduler, 1)
    bus = await client(stack, nats_server.url)
    reply = await bus.request(subjects.ROUTE, route_request(1, "_INBOX.unused"), RouteReply, timeout=2)
    assert reply.state_seq == worker.seq  # copied from the worker's ack
    record = scheduler.fleet.get("w0")
    assert set(record.pending) == {request_key("req-1")} and record.view.load == 1
    await worker.publish_state()  # the new state lists req-1 as running
    await wait_until(lambda: not scheduler.fleet.get("w0").pending)
    assert scheduler.fleet.get("w0").view.load == 1  # counted once, now from the state


async def test_two_replicas_in_a_queue_group_route_each_request_once(nats_server, stack):
    replicas = [await start_scheduler(stack, nats_server.url, name=f"scheduler-{i}") for i in range(2)]
    workers = [await start_worker(stack, nats_server.url, f"w{i}", mode="stall") for i in range(2)]
    for replica in replicas:
        await wait_for_workers(replica, 2)
    bus = await client(stack, nats_server.url)
    count = 40
    replies = await asyncio.gather(*(bus.request(subjects.ROUTE, route_request(n, "_INBOX.unused"), RouteReply,
                                                 timeout=5) for n in range(count)))
    assert sorted(r.request_id for r in replies) == sorted(f"req-{n}" for n in range(count))
    submitted = [s.request_id for w in workers for s in w.submits]
    assert sorted(submitted) == sorted(f"req-{n}" for n in range(count))  # each exactly once
    assert sum(r.routed for r in replicas) == count
    assert all(r.routed > 0 for r in replicas)  # the queue group spreads the work


async def test_no_live_worker_gets_a_terminal_no_capacity_chunk_within_the_deadline(nats_server, stack):
    await start_scheduler(stack, nats_server.url)
    bus = await client(stack, nats_server.url)
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    started = time.monotonic()
    with pytest.raises(RemoteError) as raised:
        await bus.request(subjects.ROUTE, route_request(1, inbox, deadline_ms=300), RouteReply, timeout=3)
    elapsed = time.monotonic() - started
    assert raised.value.info.code == "no_capacity"
    chunk = Chunk.decode((await sub.next_msg(timeout=1)).data)
    assert chunk.finish_reason == "error" and chunk.error.code == "no_capacity" and chunk.request_id == "req-1"
    assert 0.25 <= elapsed < 1.0


async def test_a_worker_that_appears_before_the_deadline_gets_the_request(nats_server, stack):
    await start_scheduler(stack, nats_server.url)
    bus = await client(stack, nats_server.url)
    pending = asyncio.ensure_future(bus.request(subjects.ROUTE, route_request(1, "_INBOX.x", deadline_ms=3000),
                                                RouteReply, timeout=5))
    await asyncio.sleep(0.2)
    assert not pending.done()
    await start_worker(stack, nats_server.url, "late")
    assert (await pending).worker_id == "late"


async def test_a_worker_that_misses_its_heartbeats_is_dead(nats_server, stack):
    scheduler = await start_scheduler(stack, nats_server.url, heartbeat_interval_s=0.05, missed_heartbeats=4)
    alive = await start_worker(stack, nats_server.url, "alive")
    dying = await start_worker(stack, nats_server.url, "dying")
    await wait_for_workers(scheduler, 2)
    dying._publisher.cancel()  # keeps answering submits but stops its heartbeat
    await wait_until(lambda: not scheduler.fleet.is_live("dying", scheduler.clock()), timeout_s=2)
    bus = await client(stack, nats_server.url)
    replies = [await bus.request(subjects.ROUTE, route_request(n, "_INBOX.x"), RouteReply, timeout=2)
               for n in range(4)]
    assert {r.worker_id for r in replies} == {"alive"} and not dying.submits
    assert len(alive.submits) == 4


async def test_a_worker_without_a_submit_subscriber_is_forgotten_and_skipped(nats_server, stack):
    scheduler = await start_scheduler(stack, nats_server.url)
    good = await start_worker(stack, nats_server.url, "good", state_interval_s=10.0, mode="stall")
    await wait_for_workers(scheduler, 1)
    bus = await client(stack, nats_server.url)
    ghost = WorkerState(worker_id="ghost", model="tiny", backend="bgmv", max_batch_size=8, max_model_len=4096,
                        seq=1, timestamp=time.time())
    for n in range(2):  # make "good" look busier than the idle ghost
        await bus.request(subjects.ROUTE, route_request(n, "_INBOX.x"), RouteReply, timeout=2)
    await bus.publish(subjects.state("ghost"), ghost)
    await wait_for_workers(scheduler, 2)
    reply = await bus.request(subjects.ROUTE, route_request(9, "_INBOX.x"), RouteReply, timeout=2)
    assert reply.worker_id == "good" and scheduler.fleet.get("ghost") is None
    assert len(good.submits) == 3


async def test_overloaded_worker_is_skipped_and_other_refusals_are_terminal(nats_server, stack):
    scheduler = await start_scheduler(stack, nats_server.url)
    busy = await start_worker(stack, nats_server.url, "busy", mode="refuse", refuse_code="overloaded")
    await wait_for_workers(scheduler, 1)
    bus = await client(stack, nats_server.url)
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    with pytest.raises(RemoteError) as raised:
        await bus.request(subjects.ROUTE, route_request(1, inbox, deadline_ms=300), RouteReply, timeout=3)
    assert raised.value.info.code == "no_capacity" and len(busy.submits) >= 1
    assert Chunk.decode((await sub.next_msg(timeout=1)).data).error.code == "no_capacity"

    busy.refuse_code = "context_length_exceeded"
    with pytest.raises(RemoteError) as raised:
        await bus.request(subjects.ROUTE, route_request(2, inbox), RouteReply, timeout=3)
    assert raised.value.info.code == "context_length_exceeded"
    chunk = Chunk.decode((await sub.next_msg(timeout=1)).data)
    assert chunk.request_id == "req-2" and chunk.error.code == "context_length_exceeded"


async def test_mute_worker_times_out_gets_a_cancel_and_the_request_moves_on(nats_server, stack):
    scheduler = await start_scheduler(stack, nats_server.url, submit_timeout_s=0.2)
    mute = await start_worker(stack, nats_server.url, "mute", mode="mute")
    await wait_for_workers(scheduler, 1)
    bus = await client(stack, nats_server.url)
    pending = asyncio.ensure_future(bus.request(subjects.ROUTE, route_request(1, "_INBOX.x", deadline_ms=3000),
                                                RouteReply, timeout=5))
    await wait_until(lambda: mute.cancels == ["req-1"])
    await start_worker(stack, nats_server.url, "ok")
    assert (await pending).worker_id == "ok"


async def test_requests_go_only_to_workers_that_know_the_adapter_and_model(nats_server, stack):
    scheduler = await start_scheduler(stack, nats_server.url)
    plain = await start_worker(stack, nats_server.url, "plain")
    lora = await start_worker(stack, nats_server.url, "lora", adapters=[AdapterInfo(name="sql", rank=16, level="host")])
    other = await start_worker(stack, nats_server.url, "other", model="other-model")
    await wait_for_workers(scheduler, 3)
    bus = await client(stack, nats_server.url)
    for n in range(3):
        reply = await bus.request(subjects.ROUTE, route_request(n, "_INBOX.x", adapter="sql"), RouteReply, timeout=2)
        assert reply.worker_id == "lora"
    assert scheduler.fleet.rank_of("sql") == 16 and lora.submits[0].adapter == "sql"
    with pytest.raises(RemoteError) as raised:
        await bus.request(subjects.ROUTE, route_request(7, "_INBOX.x", adapter="unknown", deadline_ms=100),
                          RouteReply, timeout=2)
    assert raised.value.info.code == "no_capacity" and "adapter 'unknown'" in raised.value.info.message
    reply = await bus.request(subjects.ROUTE, route_request(8, "_INBOX.x", model="other-model"), RouteReply, timeout=2)
    assert reply.worker_id == "other" and not plain.submits and len(other.submits) == 1


async def test_a_bad_route_payload_gets_a_typed_error_and_the_scheduler_keeps_serving(nats_server, stack):
    await start_scheduler(stack, nats_server.url)
    await start_worker(stack, nats_server.url, "w0")
    bus = await client(stack, nats_server.url)
    for payload in (b"\xc1", b"not msgpack at all", RouteReply(request_id="x", worker_id="w").encode()):
        reply = await bus.nc.request(subjects.ROUTE, payload, timeout=2)
        assert ErrorReply.decode(reply.data).error.code == "bad_payload"
    reply = await bus.request(subjects.ROUTE, route_request(1, "_INBOX.x"), RouteReply, timeout=2)
    assert reply.worker_id == "w0"
