"""The NATS API: GenerateRequest on ``caraserve.v1.generate``, CancelRequest on ``caraserve.v1.cancel``.

A generate request's NATS reply subject is the client's inbox. Every accepted request gets
its chunks there (one per step with ``stream`` true, one in all otherwise), ending with
exactly one final chunk. A request that cannot be accepted (malformed payload, bad
parameters, unknown model, overloaded...) gets a single final error chunk.
"""

from __future__ import annotations

import logging
import re

from nats.aio.msg import Msg

from services.gateway.prepare import RequestPreparer
from services.gateway.relay import Relay
from shared.bus import Bus
from shared.schemas import CancelRequest, Chunk, ErrorInfo, GenerateRequest, SchemaError, ServiceError, unpack
from shared.schemas.names import REQUEST_ID_PATTERN

logger = logging.getLogger(__name__)

UNKNOWN_REQUEST_ID = "unknown"


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
        stream = self.relay.start(self.preparer.prepare(request), msg.headers)
        if request.stream:
            async for chunk in stream.chunks():
                await self.bus.publish(msg.reply, chunk)
        else:
            await self.bus.publish(msg.reply, await stream.collect())
        return None

    def cancel(self, request: CancelRequest, msg: Msg) -> None:
        """Cancel a request this gateway runs (other gateways ignore it)."""
        try:
            tenant = self.preparer.tenancy.authenticate(request.api_key)
        except ServiceError:
            logger.warning("cancel of %s with a bad API key ignored", request.request_id)
            return
        self.relay.cancel(request.request_id, None if self.preparer.tenancy.open else tenant)


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
