"""The NATS API: GenerateRequest on ``caraserve.v1.generate``, CancelRequest on ``caraserve.v1.cancel``.

A generate request's NATS reply subject is the client's inbox. Every accepted request gets
its chunks there (one per step with ``stream`` true, one in all otherwise), ending with
exactly one final chunk. A request that cannot be accepted (malformed payload, bad
parameters, unknown model, overloaded...) gets a single final error chunk.

Core NATS delivers at most once: chunks in flight when a connection drops are lost, and
``index`` is contiguous so that a client can tell. When the gateway's own connection was
re-established during a stream, it cannot know what its client received, so the stream ends
with a ``stream_interrupted`` error chunk (about a second after the reconnect, whether or not
another chunk came) instead of going on as if complete; the client retries. A client whose own
connection dropped sees a gap in ``index``, or, if its stream's last chunks and final were
published while it was away, nothing more: it should treat a stream still open when its own
connection comes back as interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import re

from nats.aio.msg import Msg

from services.gateway.prepare import RequestPreparer
from services.gateway.relay import Relay
from services.gateway.request_stream import RequestStream
from shared import subjects
from shared.bus import Bus
from shared.schemas import (CancelRequest, Chunk, ErrorInfo, GenerateRequest, SchemaError, ServiceError, error_info,
                            unpack)
from shared.schemas.names import REQUEST_ID_PATTERN

logger = logging.getLogger(__name__)

UNKNOWN_REQUEST_ID = "unknown"
RECONNECT_CHECK_S = 0.25
"""How often a stream waiting for its next chunk checks whether the gateway's connection was re-established."""
INTERRUPT_SETTLE_S = 1.0
"""After its reconnect, the gateway waits this long before it sends ``stream_interrupted``: a
client that lost its connection too reconnects meanwhile (Bus: every 0.5 s) and has its inbox
subscribed again, since core NATS drops what is published to an inbox nobody listens on."""


class NatsApi:
    """Handlers for the public NATS subjects."""

    def __init__(self, bus: Bus, preparer: RequestPreparer, relay: Relay) -> None:
        self.bus = bus
        self.preparer = preparer
        self.relay = relay

    async def generate(self, request: GenerateRequest, msg: Msg) -> None:
        if not msg.reply:
            logger.warning("generate request without a reply inbox dropped")
            return None
        if subjects.is_internal_inbox(msg.reply):  # chunks injected into another request's stream
            logger.warning("generate request with an internal reply subject dropped")
            return None
        stream = self.relay.start(await self.preparer.prepare(request), msg.headers, reply_to=msg.reply)
        try:
            if request.stream:
                await self._stream(stream, msg.reply)
            else:
                await self.bus.publish(msg.reply, await stream.collect())
        finally:
            stream.cancel()  # no-op once finished; a failed publish must not leave the request running
        return None

    async def _stream(self, stream: RequestStream, reply: str) -> None:
        """Publish each chunk of ``stream`` to ``reply`` while the connection holds; once it dropped,
        end the stream with ``stream_interrupted`` after the reconnect.

        The relay runs as its own task, so that a drop is noticed while it waits for the next chunk
        too: a stream whose next chunk was lost in the outage (or never comes) must not wait. No chunk
        is published while the connection is down: nats-py would buffer it and send it on the
        reconnect, before the client's inbox may be listened on again."""
        reconnects = self.bus.reconnects
        next_index = 0

        async def relay() -> bool:
            nonlocal next_index
            async for chunk in stream.chunks():
                if not self._unbroken(reconnects):
                    return False
                next_index = chunk.index + 1  # before the publish: a cut-off publish leaves a gap, not a repeat
                await self.bus.publish(reply, chunk)
                self.relay.journal.sent(stream.request_id, chunk.index + 1)
            return True

        relaying = asyncio.ensure_future(relay())
        try:
            while not relaying.done() and self._unbroken(reconnects):
                await asyncio.wait({relaying}, timeout=RECONNECT_CHECK_S)
            if relaying.done() and relaying.result():
                return
        finally:
            relaying.cancel()
        while not self.bus.connected:
            await asyncio.sleep(RECONNECT_CHECK_S)
        await asyncio.sleep(INTERRUPT_SETTLE_S)
        await self.bus.publish(reply, interrupted_chunk(stream.request_id, next_index))
        # the caller's finally cancels the request

    def _unbroken(self, reconnects: int) -> bool:
        """Whether the connection is up and has not been re-established since ``reconnects``."""
        return self.bus.connected and self.bus.reconnects == reconnects

    def cancel(self, request: CancelRequest, msg: Msg) -> None:
        """Cancel a request this gateway runs, if the canceller is its requester: it holds the
        request's cancel token, or (API keys configured) a key of the request's tenant. Anything
        else is ignored, as other gateways ignore the requests they do not run."""
        if not self.relay.cancel(request.request_id, token=request.cancel_token, tenant=self._tenant_of(request)):
            logger.debug("cancel of %s ignored (not running here, or not the requester)", request.request_id)

    def _tenant_of(self, request: CancelRequest) -> str | None:
        """The tenant a cancel's API key proves; None in open mode or without a valid key."""
        tenancy = self.preparer.tenancy
        if tenancy.open or request.api_key is None:
            return None
        try:
            return tenancy.authenticate(request.api_key)
        except ServiceError:
            logger.warning("cancel of %s with a bad API key", request.request_id)
            return None


def interrupted_chunk(request_id: str, index: int) -> Chunk:
    """The final chunk of a stream whose earlier chunks may have been lost in a NATS reconnect."""
    return Chunk(request_id=request_id, index=index, finish_reason="error", error=error_info(
        "stream_interrupted", "the gateway's NATS connection dropped during the stream; chunks may be lost"))


def error_chunk(info: ErrorInfo, payload: bytes) -> Chunk:
    """The single final chunk that answers a generate request the gateway refused."""
    return Chunk(request_id=_request_id_of(payload), index=0, finish_reason="error", error=info)


def _request_id_of(payload: bytes) -> str:
    try:
        request_id = unpack(payload).get("request_id")
    except SchemaError:
        return UNKNOWN_REQUEST_ID
    if isinstance(request_id, str) and re.fullmatch(REQUEST_ID_PATTERN, request_id):
        return request_id
    return UNKNOWN_REQUEST_ID
