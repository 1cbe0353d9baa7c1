"""The streaming relay: route a prepared request, relay its chunks, survive worker loss.

Each accepted request becomes a :class:`RequestStream`, a producer task (span
``gateway.request``) that puts client-facing chunks on ``out``, always ending with exactly
one final chunk:

1. ask the scheduler (``route``) to place the request, with a fresh inbox per attempt;
2. relay the chunks of the worker the scheduler named (a worker whose submit timed out and
   was cancelled may still have sent a few; they are dropped), renumbering ``index`` across
   attempts and counting the generated tokens;
3. if the worker lost the request (:mod:`services.gateway.worker_watch`: it stopped
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
from services.gateway.inbox import ChunkInbox
from services.gateway.inflight import InflightLimiter
from services.gateway.prepare import PreparedRequest
from services.gateway.stream_journal import StreamJournal
from services.gateway.worker_watch import Placement, WorkerWatch
from shared import subjects
from shared.bus import Bus, yield_to_io
from shared.schemas.chunk import PrefillLoraUsage
from shared.schemas.names import request_key
from shared.schemas import (CancelRequest, Chunk, ErrorInfo, RemoteError, RouteReply, RouteRequest, SchemaError,
                            ServiceError, Usage, error_info)
from shared.telemetry import Telemetry, extract_context, start_span

logger = logging.getLogger(__name__)

_CANCEL = object()  # queue sentinels
_LOST = object()


@dataclass
class _Lost:
    worker_id: str


@dataclass
class _Progress:
    generated: list[int] = field(default_factory=list)
    index: int = 0
    first_token_at: float | None = None
    lost_at: float | None = None


class RequestStream:
    """One request's producer task and its client-facing chunk queue."""

    def __init__(self, relay: Relay, prepared: PreparedRequest, trace_headers: Mapping[str, str] | None) -> None:
        self.relay = relay
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
        span = start_span(self.relay.telemetry.tracer, "gateway.request", self._parent, attributes)
        try:
            with trace.use_span(span, end_on_exit=False):
                await self._produce(span)
            await yield_to_io()  # the final chunk goes out before the span and metrics work below
        except asyncio.CancelledError:
            self._finish(error_info("shutting_down", "the gateway is shutting down"))
            raise
        except Exception as exc:  # a bug here must still end the client's stream
            logger.exception("request %s failed", prepared.request_id)
            span.record_exception(exc)
            self._finish(error_info("internal_error", "internal error"))
        finally:
            span.set_attribute("completion_tokens", len(self._progress.generated))
            span.set_attribute("finish_reason", self.finish_reason or "")
            if self.worker_id:
                span.set_attribute("worker.id", self.worker_id)
            if self.error is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR, self.error.code))
            span.end()
            self.relay.record_metrics(self, self.finish_reason)
            self.relay.forget(self)

    async def _produce(self, span: trace.Span) -> None:
        config = self.relay.config
        exclude: list[str] = []
        for attempt in range(config.max_reroutes + 1):
            lost = await self._attempt(attempt, exclude)
            if lost is None:
                return
            exclude.append(lost.worker_id)
            span.add_event("worker_lost", {"worker.id": lost.worker_id, "attempt": attempt})
            await self.relay.cancel_on(lost.worker_id, self.request_id)  # in case it is only slow
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
        relay = self.relay
        key, inbox, queue = relay.inbox.open()
        self._queue = queue
        watch_handle: int | None = None
        try:
            reply = await self._route(attempt, exclude, inbox)
            if reply is None:
                return None
            self.worker_id = reply.worker_id
            relay.journal.placed(self.request_id, reply.worker_id)
            watch_handle = relay.watch.watch(self._placement(reply), lambda: queue.put_nowait(_LOST))
            return await self._relay(queue, reply.worker_id)
        finally:
            relay.inbox.close(key)
            self._queue = None
            if watch_handle is not None:
                relay.watch.unwatch(watch_handle)

    def _route_request(self, attempt: int, exclude: list[str], inbox: str) -> RouteRequest:
        prepared, config = self.prepared, self.relay.config
        deadline_ms = config.route_deadline_ms
        if self._progress.lost_at is not None:  # a re-route must end within the retry budget
            left = config.retry_budget_s - (time.monotonic() - self._progress.lost_at)
            deadline_ms = max(1, min(deadline_ms, int(left * 1000)))
        return RouteRequest(request_id=prepared.request_id, model=self.relay.base_model, adapter=prepared.adapter,
                            prompt_token_ids=prepared.prompt_token_ids,
                            generated_token_ids=list(self._progress.generated), sampling=prepared.sampling,
                            reply_inbox=inbox, tenant=prepared.tenant, attempt=attempt, deadline_ms=deadline_ms,
                            exclude_workers=list(exclude))

    def _placement(self, reply: RouteReply) -> Placement:
        """What the worker watch needs to tell whether the worker in ``reply`` lost this request."""
        return Placement(reply.worker_id, request_key(self.request_id), reply.state_seq, reply.instance)

    async def _route(self, attempt: int, exclude: list[str], inbox: str) -> RouteReply | None:
        """Where the scheduler placed the request; None once a final chunk was emitted."""
        if self._cancelled.is_set():
            self._finish(None, "cancelled")
            return None
        relay = self.relay
        request = self._route_request(attempt, exclude, inbox)
        routing = asyncio.ensure_future(relay.bus.request(subjects.ROUTE, request, RouteReply,
                                                          relay.config.route_timeout_s))
        cancelled = asyncio.ensure_future(self._cancelled.wait())
        await asyncio.wait({routing, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        cancelled.cancel()
        if not routing.done():  # cancelled while routing: answer now, clean up behind
            self._finish(None, "cancelled")
            relay.bus.tasks.spawn(relay.cancel_when_routed(routing, self.request_id))
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
        stall = self.relay.config.stall_timeout_s
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
                await self.relay.cancel_on(worker_id, self.request_id)
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
        """Emit the final chunk (once) and record the request's metrics; ``prefill_lora`` is the
        worker's account of the request's prefill, passed on in the usage."""
        if self.finished:
            return
        self.finished = True
        progress = self._progress
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

    def may_cancel(self, token: str | None, tenant: str | None) -> bool:
        """True if ``token`` is this request's cancel token, or ``tenant`` (given only when API
        keys are configured) is its tenant."""
        if token is not None and hmac.compare_digest(token, self.cancel_token):
            return True
        return tenant is not None and tenant == self.prepared.tenant

    @property
    def ttft_s(self) -> float | None:
        first = self._progress.first_token_at
        return None if first is None else first - self._started

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    @property
    def completion_tokens(self) -> int:
        return len(self._progress.generated)


class Relay:
    """Starts, tracks and cancels the gateway's request streams."""

    def __init__(self, bus: Bus, config: GatewayConfig, telemetry: Telemetry, inbox: ChunkInbox,
                 watch: WorkerWatch, base_model: str, journal: StreamJournal) -> None:
        self.bus = bus
        self.config = config
        self.telemetry = telemetry
        self.inbox = inbox
        self.watch = watch
        self.base_model = base_model
        self.journal = journal
        self.limiter = InflightLimiter(config.max_inflight)
        self.active: dict[str, RequestStream] = {}

    def start(self, prepared: PreparedRequest, trace_headers: Mapping[str, str] | None = None,
              reply_to: str | None = None) -> RequestStream:
        """Admit ``prepared`` (ServiceError ``overloaded`` past the fleet's capacity or ``max_inflight``,
        ``no_capacity`` with no live worker) and start streaming it. ``reply_to`` is a NATS
        client's inbox, journaled so that a restarted gateway can end the stream."""
        if prepared.request_id in self.active:
            raise ServiceError("duplicate_request_id", f"request {prepared.request_id!r} is already running")
        self.limiter.acquire(self.watch.capacity())
        stream = RequestStream(self, prepared, trace_headers)
        self.active[prepared.request_id] = stream
        self.journal.opened(prepared.request_id, reply_to)
        self.telemetry.metrics.queue_depth.add(1, {"service": "gateway"})
        self.bus.tasks.spawn(stream.run(), name=f"request {prepared.request_id}")
        return stream

    def forget(self, stream: RequestStream) -> None:
        if self.active.get(stream.request_id) is stream:
            del self.active[stream.request_id]
            self.journal.closed(stream.request_id)
            self.limiter.release()
            self.telemetry.metrics.queue_depth.add(-1, {"service": "gateway"})

    def cancel(self, request_id: str, *, token: str | None = None, tenant: str | None = None) -> bool:
        """Cancel an active request if the caller proves it is the requester (see
        :meth:`RequestStream.may_cancel`); False if there is no such request or no proof."""
        stream = self.active.get(request_id)
        if stream is None or not stream.may_cancel(token, tenant):
            return False
        stream.cancel()
        return True

    async def cancel_on(self, worker_id: str, request_id: str) -> None:
        await self.bus.publish(subjects.worker_cancel(worker_id), CancelRequest(request_id=request_id))

    async def cancel_when_routed(self, routing: asyncio.Future, request_id: str) -> None:
        """A request was cancelled while being routed: cancel it on its worker once placed."""
        try:
            reply = await routing
        except (RemoteError, NoRespondersError, asyncio.TimeoutError, SchemaError):
            return
        await self.cancel_on(reply.worker_id, request_id)

    def record_metrics(self, stream: RequestStream, reason: str | None) -> None:
        metrics = self.telemetry.metrics
        attributes = {"adapter": stream.prepared.adapter or self.base_model, "finish_reason": reason or ""}
        metrics.requests.add(1, attributes)
        metrics.e2e.record(stream.elapsed_s, attributes)
        ttft = stream.ttft_s
        if ttft is not None:
            metrics.ttft.record(ttft, attributes)
            if stream.completion_tokens > 1:
                metrics.tpot.record((stream.elapsed_s - ttft) / (stream.completion_tokens - 1), attributes)
