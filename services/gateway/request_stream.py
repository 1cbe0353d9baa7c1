"""One request's stream: route it, relay its chunks, survive worker loss.

Each accepted request becomes a :class:`RequestStream`, a producer task (span
``gateway.request``) that puts client-facing chunks on ``out``, always ending with exactly
one final chunk:

1. ask the scheduler (``route``) to place the request, with a fresh inbox per attempt;
2. relay the chunks of the worker the scheduler named (a worker whose submit timed out and
   was cancelled may still have sent a few; they are dropped), renumbering ``index`` across
   attempts and counting the generated tokens;
3. if the worker lost the request (:mod:`services.gateway.fleet_view`: it stopped
   heartbeating, restarted, or its states stopped listing the request with no final chunk
   here), or a gap in its chunks' ``index`` shows chunks were lost in transit (a NATS
   reconnect), route again with the prompt plus the tokens already relayed, excluding that
   worker, up to ``max_reroutes`` times and within ``retry_budget_s``; otherwise end with a
   ``worker_lost`` error. The worker is told to cancel, in case it still runs the request.
   A request that waits, even minutes, in a live worker's queue or prefill is not lost;
   ``stall_timeout_s`` (no chunk at all for that long) is only a last-resort bound;
4. a cancel (HTTP disconnect or ``caraserve.v1.cancel``) ends the stream with
   ``cancelled`` and tells the worker on ``worker.<id>.cancel``. A NATS cancel must prove it
   comes from the requester: the random ``cancel_token`` of the request's first chunk, or,
   with API keys, the request's tenant.

A stream gets everything it uses when it is created (:class:`StreamDeps`) and knows nothing
of the :class:`~services.gateway.relay.Relay` that started it: the relay does its own
bookkeeping when the stream's task is done.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

from nats.errors import NoRespondersError
from opentelemetry import trace

from services.gateway.config import GatewayConfig
from services.gateway.fleet_view import FleetView, Placement
from services.gateway.inbox import ChunkInbox
from services.gateway.prepare import PreparedRequest
from services.gateway.stream_journal import StreamJournal
from shared import subjects
from shared.bus import Bus, yield_to_io
from shared.schemas import (CancelRequest, Chunk, ErrorInfo, RemoteError, RouteReply, RouteRequest, SchemaError,
                            Usage, error_info)
from shared.schemas.chunk import PrefillLoraUsage
from shared.schemas.names import request_key
from shared.telemetry import extract_context, start_span
from shared.token_timing import TokenTiming

logger = logging.getLogger(__name__)

_CANCEL = object()  # queue sentinels
_LOST = object()


@dataclass(frozen=True)
class StreamDeps:
    """What every request stream uses, handed to it when it is created."""

    config: GatewayConfig  # route deadline and timeout, stall timeout, re-route budget
    bus: Bus  # route requests, worker cancels, and the cleanups that outlive a stream
    inbox: ChunkInbox  # one reply inbox per attempt
    fleet: FleetView  # says when the worker lost the request
    journal: StreamJournal  # where the request was placed, for a restarted gateway
    tracer: trace.Tracer  # the gateway.request span
    base_model: str  # the model every RouteRequest names


@dataclass
class _Lost:
    worker_id: str


@dataclass
class _Progress:
    generated: list[int] = field(default_factory=list)
    index: int = 0
    first_token_at: float | None = None
    lost_at: float | None = None
    ended_at: float | None = None  # when the final chunk was emitted


class RequestStream:
    """One request's producer task (:meth:`run`) and its client-facing chunk queue."""

    def __init__(self, deps: StreamDeps, prepared: PreparedRequest, trace_headers: Mapping[str, str] | None) -> None:
        self.deps = deps
        self.prepared = prepared
        self.out: asyncio.Queue[Chunk] = asyncio.Queue()
        self.worker_id: str | None = None
        self.finished = False
        self.finish_reason: str | None = None
        self.error: ErrorInfo | None = None
        self._parent = extract_context(trace_headers) if trace_headers else None
        self._cancelled = asyncio.Event()
        self._queue: asyncio.Queue | None = None
        self._progress = _Progress()
        self._started = time.monotonic()
        self.cancel_token = secrets.token_urlsafe(24)  # only the requester sees it (first chunk)

    @property
    def request_id(self) -> str:
        return self.prepared.request_id

    def cancel(self) -> None:
        """Abort: the stream ends with ``cancelled`` and the worker is told."""
        if self.finished or self._cancelled.is_set():
            return
        self._cancelled.set()
        if self._queue is not None:
            self._queue.put_nowait(_CANCEL)

    def may_cancel(self, token: str | None, tenant: str | None) -> bool:
        """True if ``token`` is this request's cancel token, or ``tenant`` (given only when API
        keys are configured) is its tenant."""
        if token is not None and hmac.compare_digest(token, self.cancel_token):
            return True
        return tenant is not None and tenant == self.prepared.tenant

    def timing(self) -> TokenTiming:
        """Its latencies as the client saw them (up to now while it runs)."""
        progress = self._progress
        ended = progress.ended_at if progress.ended_at is not None else time.monotonic()
        return TokenTiming.of(self._started, progress.first_token_at, ended, len(progress.generated))

    async def chunks(self) -> AsyncIterator[Chunk]:
        """The client-facing chunks, ending with the final one."""
        while True:
            chunk = await self.out.get()
            yield chunk
            if chunk.final:
                return

    async def collect(self) -> Chunk:
        """Wait for the end and return the whole output as one final chunk."""
        token_ids: list[int] = []
        text: list[str] = []
        async for chunk in self.chunks():
            token_ids.extend(chunk.token_ids)
            text.append(chunk.text)
        return Chunk(request_id=chunk.request_id, index=0, token_ids=token_ids, text="".join(text),
                     finish_reason=chunk.finish_reason, usage=chunk.usage, error=chunk.error)

    async def run(self) -> None:
        """The producer: emits chunks until the final one, whatever happens."""
        prepared = self.prepared
        attributes = {"request.id": prepared.request_id, "adapter": prepared.adapter or "", "rank": prepared.rank,
                      "tokens": len(prepared.prompt_token_ids), "tenant": prepared.tenant,
                      "max_tokens": prepared.sampling.max_tokens}
        span = start_span(self.deps.tracer, "gateway.request", self._parent, attributes)
        try:
            with trace.use_span(span, end_on_exit=False):
                await self._produce(span)
            await yield_to_io()  # the final chunk goes out before the span work below
        except asyncio.CancelledError:
            self._finish(error_info("shutting_down", "the gateway is shutting down"))
            raise
        except Exception as exc:  # a bug here must still end the client's stream
            logger.exception("request %s failed", prepared.request_id)
            span.record_exception(exc)
            self._finish(error_info("internal_error", "internal error"))
        finally:
            self._end_span(span)

    def _end_span(self, span: trace.Span) -> None:
        span.set_attribute("completion_tokens", len(self._progress.generated))
        span.set_attribute("finish_reason", self.finish_reason or "")
        if self.worker_id:
            span.set_attribute("worker.id", self.worker_id)
        if self.error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, self.error.code))
        span.end()

    async def _produce(self, span: trace.Span) -> None:
        config = self.deps.config
        exclude: list[str] = []
        for attempt in range(config.max_reroutes + 1):
            lost = await self._attempt(attempt, exclude)
            if lost is None:
                return
            exclude.append(lost.worker_id)
            span.add_event("worker_lost", {"worker.id": lost.worker_id, "attempt": attempt})
            await self._cancel_on(lost.worker_id)  # in case it is only slow
            progress = self._progress
            progress.lost_at = progress.lost_at or time.monotonic()
            if len(progress.generated) >= self.prepared.sampling.max_tokens:
                self._finish(None, "length")
                return
            if time.monotonic() - progress.lost_at >= config.retry_budget_s:
                break
        self._finish(error_info("worker_lost", "the worker serving this request was lost"))

    async def _attempt(self, attempt: int, exclude: list[str]) -> _Lost | None:
        """Route once and relay; a _Lost when the worker is presumed gone, else None (finished)."""
        deps = self.deps
        key, inbox, queue = deps.inbox.open()
        self._queue = queue
        watch_handle: int | None = None
        try:
            reply = await self._route(attempt, exclude, inbox)
            if reply is None:
                return None
            self.worker_id = reply.worker_id
            deps.journal.placed(self.request_id, reply.worker_id)
            watch_handle = deps.fleet.watch(self._placement(reply), lambda: queue.put_nowait(_LOST))
            return await self._relay(queue, reply.worker_id)
        finally:
            deps.inbox.close(key)
            self._queue = None
            if watch_handle is not None:
                deps.fleet.unwatch(watch_handle)

    def _route_request(self, attempt: int, exclude: list[str], inbox: str) -> RouteRequest:
        prepared, config = self.prepared, self.deps.config
        deadline_ms = config.route_deadline_ms
        if self._progress.lost_at is not None:  # a re-route must end within the retry budget
            left = config.retry_budget_s - (time.monotonic() - self._progress.lost_at)
            deadline_ms = max(1, min(deadline_ms, int(left * 1000)))
        return RouteRequest(request_id=prepared.request_id, model=self.deps.base_model, adapter=prepared.adapter,
                            prompt_token_ids=prepared.prompt_token_ids,
                            generated_token_ids=list(self._progress.generated), sampling=prepared.sampling,
                            reply_inbox=inbox, tenant=prepared.tenant, attempt=attempt, deadline_ms=deadline_ms,
                            exclude_workers=list(exclude))

    def _placement(self, reply: RouteReply) -> Placement:
        """What the fleet view needs to tell whether the worker in ``reply`` lost this request."""
        return Placement(reply.worker_id, request_key(self.request_id), reply.state_seq, reply.instance)

    async def _route(self, attempt: int, exclude: list[str], inbox: str) -> RouteReply | None:
        """Where the scheduler placed the request; None once a final chunk was emitted."""
        if self._cancelled.is_set():
            self._finish(None, "cancelled")
            return None
        bus = self.deps.bus
        request = self._route_request(attempt, exclude, inbox)
        routing = asyncio.ensure_future(bus.request(subjects.ROUTE, request, RouteReply,
                                                    self.deps.config.route_timeout_s))
        cancelled = asyncio.ensure_future(self._cancelled.wait())
        await asyncio.wait({routing, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        cancelled.cancel()
        if not routing.done():  # cancelled while routing: answer now, clean up behind
            self._finish(None, "cancelled")
            bus.tasks.spawn(self._cancel_when_routed(routing))
            return None
        try:
            return routing.result()
        except RemoteError as exc:
            self._finish(exc.info)
        except NoRespondersError:
            self._finish(error_info("no_capacity", "no scheduler is running"))
        except asyncio.TimeoutError:
            self._finish(error_info("timeout", "the scheduler did not answer in time"))
        except SchemaError as exc:
            self._finish(error_info("internal_error", f"bad answer from the scheduler: {exc}"))
        return None

    async def _relay(self, queue: asyncio.Queue, worker_id: str) -> _Lost | None:
        stall = self.deps.config.stall_timeout_s
        expected = 0  # the worker's next chunk index
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), stall)
            except asyncio.TimeoutError:
                logger.warning("request %s: no chunk from worker %s for %.0f s; re-routing it", self.request_id,
                               worker_id, stall)
                return _Lost(worker_id)
            if item is _LOST:
                return _Lost(worker_id)
            if item is _CANCEL:
                await self._cancel_on(worker_id)
                self._finish(None, "cancelled")
                return None
            if item.request_id != self.request_id or item.worker_id not in (None, worker_id):
                continue  # another worker's chunks: a submit the scheduler gave up on and cancelled
            if item.index != expected:
                logger.warning("request %s: chunk %d from worker %s where %d was due (chunks lost in transit); "
                               "re-routing it", self.request_id, item.index, worker_id, expected)
                return _Lost(worker_id)
            expected += 1
            self._emit(item)
            if item.final:
                return None

    async def _cancel_on(self, worker_id: str) -> None:
        """Tell ``worker_id`` to drop this request."""
        await self.deps.bus.publish(subjects.worker_cancel(worker_id), CancelRequest(request_id=self.request_id))

    async def _cancel_when_routed(self, routing: asyncio.Future) -> None:
        """The request was cancelled while being routed: cancel it on its worker once placed."""
        try:
            reply = await routing
        except (RemoteError, NoRespondersError, asyncio.TimeoutError, SchemaError):
            return
        await self._cancel_on(reply.worker_id)

    def _emit(self, chunk: Chunk) -> None:
        """Relay one worker chunk to the client (renumbered; usage computed here when final)."""
        progress = self._progress
        if chunk.token_ids and progress.first_token_at is None:
            progress.first_token_at = time.monotonic()
        progress.generated.extend(chunk.token_ids)
        if chunk.final:
            lora = chunk.usage.prefill_lora if chunk.usage is not None else None
            self._finish(chunk.error, chunk.finish_reason, chunk.token_ids, chunk.text, lora)
            return
        self.out.put_nowait(Chunk(request_id=self.request_id, index=progress.index, token_ids=chunk.token_ids,
                                  text=chunk.text, cancel_token=self._token_if_first()))
        progress.index += 1

    def _finish(self, error: ErrorInfo | None, reason: str | None = None, token_ids: list[int] | None = None,
                text: str = "", prefill_lora: PrefillLoraUsage | None = None) -> None:
        """Emit the final chunk (once); ``prefill_lora`` is the worker's account of the request's
        prefill, passed on in the usage."""
        if self.finished:
            return
        self.finished = True
        progress = self._progress
        progress.ended_at = time.monotonic()
        reason = "error" if error is not None else reason
        self.finish_reason, self.error = reason, error
        prompt = len(self.prepared.prompt_token_ids)
        usage = Usage(prompt_tokens=prompt, completion_tokens=len(progress.generated),
                      total_tokens=prompt + len(progress.generated), prefill_lora=prefill_lora)
        self.out.put_nowait(Chunk(request_id=self.request_id, index=progress.index, token_ids=token_ids or [],
                                  text=text, finish_reason=reason, usage=usage, error=error,
                                  cancel_token=self._token_if_first()))

    def _token_if_first(self) -> str | None:
        """The cancel token, on the first client-facing chunk only."""
        return self.cancel_token if self._progress.index == 0 else None
