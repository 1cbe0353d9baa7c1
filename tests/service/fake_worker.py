"""A test stand-in for a gpu_worker that speaks the real protocol over a real NATS server.

It publishes real WorkerState messages on ``state.<id>``, answers ``worker.<id>.submit`` with
a SubmitAck, streams Chunks to the request's inbox and honours ``worker.<id>.cancel``. Its
"model" emits token ``1000 + context length`` each step, so an output continued on another
worker after a re-route is identical to an uninterrupted one. Test helper only.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from shared import subjects
from shared.bus import Bus
from shared.nats_auth import Credentials
from shared.schemas import (AdapterInfo, CancelRequest, Chunk, RequestLoad, ServiceError, SubmitAck, Usage,
                            WorkerState, WorkerSubmit)
from shared.schemas.names import request_key
from shared.schemas.profile import ProfileReply, ProfileRequest
from services.gpu_worker.profiling.profile_cache import profile_digest

MODES = ("ok", "mute", "refuse", "stall", "late", "drop")


def token_for(context_len: int) -> int:
    return 1000 + context_len


@dataclass
class FakeWorker:
    """``mode``: ok (ack and stream), mute (never ack), refuse (answer ``refuse_code``), stall (ack, never
    stream), late (stream at once, ack after ``ack_delay_s``: a worker too busy to answer in time), drop
    (stream ``drop_after`` tokens, then forget the request without a final chunk, as if it was lost).
    ``queue_s``: each request first waits this long listed as queued (a busy queue, a long prefill)."""

    url: str
    worker_id: str
    model: str = "tiny"
    adapters: list[AdapterInfo] = field(default_factory=list)
    max_batch: int = 8
    max_model_len: int = 4096
    state_interval_s: float = 0.05
    step_s: float = 0.002
    mode: str = "ok"
    refuse_code: str = "overloaded"
    ack_delay_s: float = 1.0
    queue_s: float = 0.0
    drop_after: int = 2
    publish_states: bool = True
    credentials: Credentials | None = None
    backend: str = "bgmv"
    profile_text: str = ""  # a profile JSON it serves on worker.<id>.profile ("" : none)
    profile: str = ""  # its state's profile status; set from profile_text's digest when that is given
    profile_requests: int = 0
    submits: list[WorkerSubmit] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    seq: int = 0
    _bus: Bus | None = None
    _tasks: dict[str, asyncio.Task] = field(default_factory=dict)
    _running: dict[str, RequestLoad] = field(default_factory=dict)
    _queued: dict[str, RequestLoad] = field(default_factory=dict)
    _publisher: asyncio.Task | None = None

    async def start(self) -> FakeWorker:
        assert self.mode in MODES
        self._bus = await Bus.open(self.url, f"fake-{self.worker_id}", credentials=self.credentials)
        await self._bus.serve(subjects.worker_submit(self.worker_id), WorkerSubmit, self._on_submit)
        await self._bus.serve(subjects.worker_cancel(self.worker_id), CancelRequest, self._on_cancel)
        await self._bus.serve(subjects.worker_profile(self.worker_id), ProfileRequest, self._on_profile)
        if self.profile_text:
            self.profile = profile_digest(self.profile_text)
        if self.publish_states:
            await self.publish_state()
            self._publisher = asyncio.get_running_loop().create_task(self._publish_loop())
        return self

    def state(self) -> WorkerState:
        return WorkerState(worker_id=self.worker_id, model=self.model, backend=self.backend, profile=self.profile,
                           running=list(self._running.values()), queued=list(self._queued.values()),
                           adapters=list(self.adapters),
                           free_kv_blocks=100, total_kv_blocks=100, block_size=16,
                           max_batch_size=self.max_batch, max_model_len=self.max_model_len,
                           seq=self.seq, timestamp=time.time())

    async def publish_state(self) -> None:
        assert self._bus is not None
        self.seq += 1
        await self._bus.publish(subjects.state(self.worker_id), self.state())

    async def _publish_loop(self) -> None:
        while True:
            await asyncio.sleep(self.state_interval_s)
            await self.publish_state()

    async def _on_profile(self, request: ProfileRequest, msg: Msg) -> ProfileReply:
        self.profile_requests += 1
        if not self.profile_text:
            raise ServiceError("profile_not_ready", "the fake worker has no profile")
        return ProfileReply(worker_id=self.worker_id, digest=self.profile, profile=self.profile_text)

    async def _on_submit(self, submit: WorkerSubmit, msg: Msg) -> SubmitAck | None:
        self.submits.append(submit)
        if self.mode == "mute":
            return None
        if self.mode == "refuse":
            raise ServiceError(self.refuse_code, "refused by the fake worker")
        rank = next((a.rank for a in self.adapters if a.name == submit.adapter), 8) if submit.adapter else 0
        load = RequestLoad(key=request_key(submit.request_id), adapter=submit.adapter, rank=rank,
                           prompt_tokens=len(submit.prompt_token_ids),
                           generated_tokens=len(submit.generated_token_ids),
                           remaining_tokens=submit.remaining_tokens())
        (self._queued if self.queue_s else self._running)[submit.request_id] = load
        ack = SubmitAck(request_id=submit.request_id, worker_id=self.worker_id, state_seq=self.seq)
        if self.mode in ("ok", "late", "drop"):
            task = asyncio.get_running_loop().create_task(self._generate(submit))
            self._tasks[submit.request_id] = task
        if self.mode == "late":
            await asyncio.sleep(self.ack_delay_s)
        return ack

    async def _generate(self, submit: WorkerSubmit) -> None:
        assert self._bus is not None
        context = len(submit.prompt_token_ids) + len(submit.generated_token_ids)
        remaining = submit.remaining_tokens()
        try:
            if self.queue_s:
                await asyncio.sleep(self.queue_s)
                self._running[submit.request_id] = self._queued.pop(submit.request_id)
            for index in range(remaining):
                if self.mode == "drop" and index == self.drop_after:
                    return
                await asyncio.sleep(self.step_s)
                token = token_for(context + index)
                final = index == remaining - 1
                generated = len(submit.generated_token_ids) + index + 1
                usage = Usage(prompt_tokens=len(submit.prompt_token_ids), completion_tokens=generated,
                              total_tokens=len(submit.prompt_token_ids) + generated) if final else None
                chunk = Chunk(request_id=submit.request_id, index=index, token_ids=[token], text=f" t{token}",
                              finish_reason="length" if final else None, usage=usage, worker_id=self.worker_id)
                await self._bus.publish(submit.reply_inbox, chunk)
        finally:
            self._running.pop(submit.request_id, None)
            self._queued.pop(submit.request_id, None)
            self._tasks.pop(submit.request_id, None)

    async def _on_cancel(self, cancel: CancelRequest, msg: Msg) -> None:
        self.cancels.append(cancel.request_id)
        self._running.pop(cancel.request_id, None)
        self._queued.pop(cancel.request_id, None)
        task = self._tasks.pop(cancel.request_id, None)
        if task is not None:
            task.cancel()
        return None

    @property
    def running_ids(self) -> set[str]:
        return set(self._running)

    async def stop(self) -> None:
        """Disappear at once, like a killed process: no more states, chunks or answers."""
        for task in [self._publisher, *self._tasks.values()]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._tasks.clear()
        self._publisher = None
        if self._bus is not None:
            await self._bus.nc.close()
            self._bus = None
