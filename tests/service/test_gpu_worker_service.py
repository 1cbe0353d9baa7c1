"""The gpu_worker service over a real nats-server: submit, stream, state, cancel, bad input."""

from __future__ import annotations

import asyncio

import pytest

from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.service import GpuWorkerService
from services.gpu_worker.worker_config import WorkerConfig
from shared import subjects
from shared.bus import Bus
from shared.schemas import (CancelRequest, Chunk, ErrorReply, RemoteError, Sampling, SubmitAck, WorkerState,
                            WorkerSubmit)


async def start_worker(nats_server, stack, model_dir, adapters, worker_id="w1", **engine) -> GpuWorkerService:
    config = WorkerConfig(worker_id=worker_id, nats_url=nats_server.url, model=str(model_dir),
                          adapters=tuple(f"{n}={p}" for n, p in adapters.items()), state_interval_s=0.05)
    service = GpuWorkerService(config, EngineConfig(dtype="float32", device="cpu", **engine))
    await service.start(stack)
    return service


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
        if any("long" in s.request_ids() for s in states):
            break
        await asyncio.sleep(0.02)
    assert any("long" in s.request_ids() for s in states)
    await client.publish(subjects.worker_cancel("w1"), CancelRequest(request_id="long"))
    await asyncio.wait_for(inbox.done.wait(), 30)
    assert inbox.chunks[-1].finish_reason == "cancelled"
    await asyncio.sleep(0.2)
    last = states[-1]
    assert "long" not in last.request_ids()
    assert last.free_kv_blocks == last.total_kv_blocks == service.engine.blocks.num_blocks
    assert last.model and last.backend == "bgmv"
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
