"""The gpu_worker service over a real nats-server: submit, stream, state, cancel, bad input."""

from __future__ import annotations

import asyncio

import pytest

from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.service import EXIT_ENGINE_DIED, GpuWorkerService
from services.gpu_worker.worker_config import WorkerConfig
from shared import subjects
from shared.bus import Bus
from shared.schemas import (CancelRequest, Chunk, ErrorReply, RemoteError, RouteReply, RouteRequest, Sampling,
                            SubmitAck, WorkerState, WorkerSubmit)
from shared.schemas.names import request_key
from tests.service.helpers import start_scheduler


async def start_worker(nats_server, stack, model_dir, adapters, worker_id="w1", max_queued=64, exit_process=None,
                       **engine) -> GpuWorkerService:
    config = WorkerConfig(worker_id=worker_id, nats_url=nats_server.url, auto_profile=False, model=str(model_dir),
                          adapters=tuple(f"{n}={p}" for n, p in adapters.items()), state_interval_s=0.05,
                          max_queued=max_queued)
    service = GpuWorkerService(config, EngineConfig(dtype="float32", device="cpu", **engine),
                               exit_process=exit_process or _no_exit)
    await service.start(stack)
    return service


def _no_exit(status: int) -> None:
    raise AssertionError(f"the worker tried to exit with status {status}")


class Inbox:
    """Collects the chunks of one request from a reply inbox."""

    def __init__(self, bus: Bus, subject: str) -> None:
        self.bus, self.subject = bus, subject
        self.chunks: list[Chunk] = []
        self.done = asyncio.Event()

    async def open(self) -> "Inbox":
        await self.bus.listen(self.subject, Chunk, self._on_chunk)
        return self

    def _on_chunk(self, chunk: Chunk, msg) -> None:
        self.chunks.append(chunk)
        if chunk.final:
            self.done.set()

    @property
    def token_ids(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]


def submit_for(request_id: str, inbox: str, adapter=None, max_tokens=6, prompt=(5, 6, 7, 8), **sampling) -> WorkerSubmit:
    return WorkerSubmit(request_id=request_id, model="tiny", adapter=adapter, prompt_token_ids=list(prompt),
                        sampling=Sampling(max_tokens=max_tokens, temperature=0, ignore_eos=True, **sampling),
                        reply_inbox=inbox, worker_id="w1")


@pytest.fixture
async def client(nats_server, stack):
    return await Bus.open(nats_server.url, "test-client", stack)


async def test_submit_streams_every_token_then_one_final_chunk(nats_server, stack, client, tiny_model_dir,
                                                                tiny_adapters):
    name = next(iter(tiny_adapters))
    await start_worker(nats_server, stack, tiny_model_dir, tiny_adapters)
    inbox = await Inbox(client, "_INBOX.test.a").open()
    ack = await client.request(subjects.worker_submit("w1"), submit_for("a", inbox.subject, adapter=name), SubmitAck, 5)
    assert ack.worker_id == "w1"
    await asyncio.wait_for(inbox.done.wait(), 30)
    assert len(inbox.token_ids) == 6
    assert [c.index for c in inbox.chunks] == list(range(len(inbox.chunks)))
    assert {c.worker_id for c in inbox.chunks} == {"w1"}  # the gateway relays only its routed worker's chunks
    final = inbox.chunks[-1]
    assert final.finish_reason == "length" and final.usage.completion_tokens == 6 and final.usage.prompt_tokens == 4
    assert sum(c.final for c in inbox.chunks) == 1


async def test_rerouted_request_continues_from_generated_tokens(nats_server, stack, client, tiny_model_dir):
    await start_worker(nats_server, stack, tiny_model_dir, {})
    whole = await Inbox(client, "_INBOX.test.whole").open()
    await client.request(subjects.worker_submit("w1"), submit_for("whole", whole.subject, max_tokens=8), SubmitAck, 5)
    await asyncio.wait_for(whole.done.wait(), 30)
    rest = await Inbox(client, "_INBOX.test.rest").open()
    resumed = submit_for("rest", rest.subject, max_tokens=8)
    resumed.generated_token_ids = whole.token_ids[:3]
    await client.request(subjects.worker_submit("w1"), resumed, SubmitAck, 5)
    await asyncio.wait_for(rest.done.wait(), 30)
    assert whole.token_ids[:3] + rest.token_ids == whole.token_ids
    assert rest.chunks[-1].usage.completion_tokens == 8


async def test_state_reports_running_requests_and_cancel_frees_blocks(nats_server, stack, client, tiny_model_dir):
    service = await start_worker(nats_server, stack, tiny_model_dir, {})
    states: list[WorkerState] = []
    await client.listen(subjects.state("w1"), WorkerState, lambda s, m: states.append(s))
    inbox = await Inbox(client, "_INBOX.test.long").open()
    await client.request(subjects.worker_submit("w1"), submit_for("long", inbox.subject, max_tokens=480),
                         SubmitAck, 5)
    for _ in range(200):
        if any(request_key("long") in s.request_keys() for s in states):
            break
        await asyncio.sleep(0.02)
    assert any(request_key("long") in s.request_keys() for s in states)
    await client.publish(subjects.worker_cancel("w1"), CancelRequest(request_id="long"))
    await asyncio.wait_for(inbox.done.wait(), 30)
    assert inbox.chunks[-1].finish_reason == "cancelled"
    await asyncio.sleep(0.2)
    last = states[-1]
    assert request_key("long") not in last.request_keys()
    assert last.free_kv_blocks == last.total_kv_blocks == service.engine.blocks.num_blocks
    assert last.model and last.backend == "mbgmv"  # backend auto starts on mbgmv
    gaps = [b.timestamp - a.timestamp for a, b in zip(states, states[1:])]
    assert max(gaps) < 0.5, "state must be published at least every state_interval_s"


async def test_bad_submits_get_typed_errors(nats_server, stack, client, tiny_model_dir):
    await start_worker(nats_server, stack, tiny_model_dir, {})
    with pytest.raises(RemoteError) as err:
        await client.request(subjects.worker_submit("w1"), submit_for("x", "_INBOX.x", adapter="nope"), SubmitAck, 5)
    assert err.value.info.code == "model_not_found"
    reply = await client.nc.request(subjects.worker_submit("w1"), b"\x93garbage", timeout=5)
    assert ErrorReply.decode(reply.data).error.code == "bad_payload"
    ok = await Inbox(client, "_INBOX.test.ok").open()
    await client.request(subjects.worker_submit("w1"), submit_for("ok", ok.subject, max_tokens=2), SubmitAck, 5)
    await asyncio.wait_for(ok.done.wait(), 30)
    assert ok.chunks[-1].finish_reason == "length"


async def test_a_duplicate_id_is_refused_and_the_running_request_is_untouched(nats_server, stack, client,
                                                                              tiny_model_dir):
    await start_worker(nats_server, stack, tiny_model_dir, {})
    victim = await Inbox(client, "_INBOX.test.victim").open()
    await client.request(subjects.worker_submit("w1"), submit_for("same", victim.subject, max_tokens=40), SubmitAck, 5)
    intruder = await Inbox(client, "_INBOX.test.intruder").open()
    with pytest.raises(RemoteError) as err:
        await client.request(subjects.worker_submit("w1"), submit_for("same", intruder.subject, max_tokens=2),
                             SubmitAck, 5)
    assert err.value.info.code == "duplicate_request_id"
    await asyncio.wait_for(victim.done.wait(), 30)
    assert victim.chunks[-1].finish_reason == "length" and len(victim.token_ids) == 40
    assert [c.index for c in victim.chunks] == list(range(len(victim.chunks)))
    assert not intruder.chunks
    await client.request(subjects.worker_submit("w1"), submit_for("same", intruder.subject, max_tokens=2),
                         SubmitAck, 5)  # the id is free once the victim finished
    await asyncio.wait_for(intruder.done.wait(), 30)


async def test_a_full_worker_refuses_as_overloaded_and_states_show_keys_capacity_and_instance(
        nats_server, stack, client, tiny_model_dir):
    service = await start_worker(nats_server, stack, tiny_model_dir, {}, max_queued=1, max_batch_size=1)
    states: list[WorkerState] = []
    await client.listen(subjects.state("w1"), WorkerState, lambda s, m: states.append(s))
    inboxes = [await Inbox(client, f"_INBOX.test.q{i}").open() for i in range(3)]
    acks = [await client.request(subjects.worker_submit("w1"), submit_for(f"q{i}", inboxes[i].subject,
                                                                          max_tokens=60), SubmitAck, 5)
            for i in range(2)]
    with pytest.raises(RemoteError) as err:
        await client.request(subjects.worker_submit("w1"), submit_for("q2", inboxes[2].subject), SubmitAck, 5)
    assert err.value.info.code == "overloaded"
    assert {a.instance for a in acks} == {service.instance} and len(service.instance) == 16
    while not any(s.seq > acks[1].state_seq for s in states):
        await asyncio.sleep(0.02)
    shown = next(s for s in states if s.seq > acks[1].state_seq)
    assert shown.request_keys() == {request_key("q0"), request_key("q1")}
    assert (shown.max_batch_size, shown.max_queued, shown.instance) == (1, 1, service.instance)
    assert b"q0" not in shown.encode() and b"q1" not in shown.encode()  # no request id leaks into the state
    await asyncio.wait_for(asyncio.gather(inboxes[0].done.wait(), inboxes[1].done.wait()), 60)


class EngineKilled(BaseException):
    """Not an Exception: nothing in the engine's own error handling catches it."""


async def test_a_dead_engine_fails_its_requests_stops_states_and_exits_non_zero(nats_server, stack, client,
                                                                                 tiny_model_dir):
    exits: list[int] = []
    exited = asyncio.Event()

    def record_exit(status: int) -> None:
        exits.append(status)
        exited.set()

    service = await start_worker(nats_server, stack, tiny_model_dir, {}, exit_process=record_exit)
    states: list[WorkerState] = []
    await client.listen(subjects.state("w1"), WorkerState, lambda s, m: states.append(s))
    doomed = await Inbox(client, "_INBOX.test.doomed").open()
    await client.request(subjects.worker_submit("w1"), submit_for("doomed", doomed.subject, max_tokens=400),
                         SubmitAck, 5)
    while not doomed.chunks:
        await asyncio.sleep(0.01)

    def killed_step():
        raise EngineKilled()

    service.engine.step = killed_step
    await asyncio.wait_for(exited.wait(), 10)
    assert exits == [EXIT_ENGINE_DIED] and not service.healthy
    await asyncio.wait_for(doomed.done.wait(), 5)
    final = doomed.chunks[-1]
    assert final.finish_reason == "error" and final.error.code == "worker_error"
    assert sum(c.final for c in doomed.chunks) == 1
    seen = len(states)
    await asyncio.sleep(0.5)  # ten state intervals
    assert len(states) == seen, "a worker without an engine must stop heartbeating"
    with pytest.raises(RemoteError) as err:
        await client.request(subjects.worker_submit("w1"), submit_for("late", "_INBOX.test.late"), SubmitAck, 5)
    assert err.value.info.code == "worker_error"


async def test_the_route_reply_carries_the_workers_instance_and_ack_state_seq(nats_server, stack, client,
                                                                               tiny_model_dir):
    service = await start_worker(nats_server, stack, tiny_model_dir, {})
    scheduler = await start_scheduler(stack, nats_server.url)
    while scheduler.fleet.get("w1") is None:
        await asyncio.sleep(0.02)
    inbox = await Inbox(client, "_INBOX.test.routed").open()
    route = RouteRequest(request_id="routed", model=service.model_name, prompt_token_ids=[5, 6, 7],
                         sampling=Sampling(max_tokens=3, temperature=0), reply_inbox=inbox.subject)
    seq_before = service.seq
    reply = await client.request(subjects.ROUTE, route, RouteReply, 5)
    assert (reply.worker_id, reply.instance) == ("w1", service.instance)
    assert seq_before <= reply.state_seq <= service.seq
    await asyncio.wait_for(inbox.done.wait(), 30)
