"""The relay: admits requests, runs each as a :class:`~services.gateway.request_stream.RequestStream`,
tracks the ones in flight and cancels them on their requester's word.

Admission is :class:`~services.gateway.inflight.InflightLimiter` against the fleet's
capacity (429 ``overloaded``, 503 ``no_capacity``). A stream's task runs on the bus's task
set; when it is done, whatever ended it, a done-callback records the request's metrics and
frees its slot, its journal row and its entry here.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.gateway.inflight import InflightLimiter
from services.gateway.prepare import PreparedRequest
from services.gateway.request_stream import RequestStream, StreamDeps
from shared.schemas import ServiceError
from shared.telemetry import ServingMetrics

GATEWAY = {"service": "gateway"}  # the queue depth's attributes


class Relay:
    """Starts, tracks and cancels the gateway's request streams."""

    def __init__(self, deps: StreamDeps, metrics: ServingMetrics) -> None:
        self.deps = deps
        self.metrics = metrics
        self.journal = deps.journal
        self.limiter = InflightLimiter(deps.config.max_inflight)
        self.active: dict[str, RequestStream] = {}

    def start(self, prepared: PreparedRequest, trace_headers: Mapping[str, str] | None = None,
              reply_to: str | None = None) -> RequestStream:
        """Admit ``prepared`` (ServiceError ``overloaded`` past the fleet's capacity or ``max_inflight``,
        ``no_capacity`` with no live worker) and start streaming it. ``reply_to`` is a NATS
        client's inbox, journaled so that a restarted gateway can end the stream."""
        if prepared.request_id in self.active:
            raise ServiceError("duplicate_request_id", f"request {prepared.request_id!r} is already running")
        self.limiter.acquire(self.deps.fleet.capacity())
        stream = RequestStream(self.deps, prepared, trace_headers)
        self.active[prepared.request_id] = stream
        self.journal.opened(prepared.request_id, reply_to)
        self.metrics.queue_depth.add(1, GATEWAY)
        task = self.deps.bus.tasks.spawn(stream.run(), name=f"request {prepared.request_id}")
        task.add_done_callback(lambda _task: self._ended(stream))
        return stream

    def _ended(self, stream: RequestStream) -> None:
        """``stream``'s task is done: free what it held and record its metrics."""
        del self.active[stream.request_id]
        self.journal.closed(stream.request_id)
        self.limiter.release()
        self.metrics.queue_depth.add(-1, GATEWAY)
        attributes = {"adapter": stream.prepared.adapter or self.deps.base_model,
                      "finish_reason": stream.finish_reason or ""}
        self.metrics.requests.add(1, attributes)
        stream.timing().record(self.metrics, attributes)

    def cancel(self, request_id: str, *, token: str | None = None, tenant: str | None = None) -> bool:
        """Cancel an active request if the caller proves it is the requester (see
        :meth:`RequestStream.may_cancel`); False if there is no such request or no proof."""
        stream = self.active.get(request_id)
        if stream is None or not stream.may_cancel(token, tenant):
            return False
        stream.cancel()
        return True
