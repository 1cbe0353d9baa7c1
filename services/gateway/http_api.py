"""The OpenAI-compatible HTTP API on aiohttp.

- ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream`` true: SSE ending
  with ``data: [DONE]``; false: one JSON object);
- ``GET /v1/models``: the base model and the adapters (each with ``parent`` and the
  ``workers`` holding it, with their tier), filtered to what the caller's tenant may use;
- ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``: see ``adapter_admin.py``;
- ``GET /health``.

Errors are OpenAI-style ``{"error": {"message", "type", "code", "param"}}`` with the status from
``shared.schemas.ERROR_CODES`` (400, 401, 404, 413, 429, 503); the framework's own answers
(unknown path, wrong method, body too large) get the same shape from :func:`openai_errors`.
Bodies are decoded within bounds (``json_body.py``), and everything about a request is checked
before it starts, so a bad one is refused without leaving work running. A streaming response
starts only with the first chunk, so a request that fails before producing anything still gets
a proper error status. A client that disconnects cancels its request (the handler is
cancelled and the stream is told).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from services.gateway.json_body import parse_json_body
from services.gateway.openai_format import error_body, generate_request, include_usage, response_body, sse_events
from services.gateway.prepare import MAX_CHARS_PER_TOKEN, PreparedRequest, RequestPreparer
from services.gateway.relay import Relay
from services.gateway.request_stream import RequestStream
from shared.schemas import ErrorInfo, ServiceError, error_info, http_status

logger = logging.getLogger(__name__)

BODY_ROOM_BYTES = 1024 * 1024
OWNER = "caraserve"


def error_response(info: ErrorInfo) -> web.Response:
    return web.json_response(error_body(info), status=http_status(info))


# The framework's own refusals, as error codes (any other status keeps its own, with a generic code).
HTTP_EXCEPTION_CODES = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}


@web.middleware
async def openai_errors(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Answer aiohttp's own HTTP errors (404 unknown path, 405 wrong method, 413 body too large...)
    with an OpenAI-style JSON error instead of its plain-text page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = HTTP_EXCEPTION_CODES.get(exc.status, "internal_error" if exc.status >= 500 else "invalid_request")
        info = error_info(code, f"Invalid URL ({request.method} {request.path})" if code == "unknown_url"
                          else exc.text or exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response(error_body(info), status=exc.status, headers=headers)


def bearer_key(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return key.strip()


def max_body_bytes(max_model_len: int) -> int:
    """The largest body a valid request can need: its prompt's character bound (``max_model_len``
    × MAX_CHARS_PER_TOKEN), each character JSON-escaped (a ``\\u`` escape, 6 bytes), plus 1 MiB of room.
    A larger body is refused with 413 before it is read in full, so that parsing a body never
    holds the event loop for long (about 2 ms per MB)."""
    return max_model_len * MAX_CHARS_PER_TOKEN * 6 + BODY_ROOM_BYTES


class HttpApi:
    """Request handlers bound to the gateway's preparer and relay."""

    def __init__(self, preparer: RequestPreparer, relay: Relay, health: Callable[[], dict[str, Any]]) -> None:
        self.preparer = preparer
        self.relay = relay
        self.health = health

    def app(self) -> web.Application:
        app = web.Application(client_max_size=max_body_bytes(self.preparer.max_model_len),
                              middlewares=[openai_errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health_check)
        return app

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = parse_json_body(await request.read())
            generate = generate_request(body, chat)
            usage = include_usage(body) and generate.stream
            prepared = await self.preparer.prepare(generate, api_key=bearer_key(request))
            stream = self.relay.start(prepared, _trace_headers(request))
        except ServiceError as exc:
            return error_response(exc.info)
        try:  # from here on the request runs: whatever happens, it is cancelled unless it finished
            if prepared.stream:
                return await self._stream(request, prepared, stream, usage)
            final = await stream.collect()
            if final.error is not None:
                return error_response(final.error)
            return web.json_response(response_body(prepared, final))
        finally:
            stream.cancel()  # no-op once finished; a disconnect cancels the handler and lands here

    async def _stream(self, request: web.Request, prepared: PreparedRequest, stream: RequestStream,
                      include_usage: bool) -> web.StreamResponse:
        chunks = stream.chunks()
        first = await anext(chunks)
        if first.final and first.error is not None and not first.token_ids:
            return error_response(first.error)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        for event in sse_events(prepared, first, True, include_usage):
            await response.write(event)
        async for chunk in chunks:
            for event in sse_events(prepared, chunk, False, include_usage):
                await response.write(event)
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        tenancy, fleet = self.preparer.tenancy, self.preparer.fleet
        try:
            tenant = tenancy.authenticate(bearer_key(request))
        except ServiceError as exc:
            return error_response(exc.info)
        base = fleet.base_model
        data = [{"id": base, "object": "model", "created": fleet.created, "owned_by": OWNER, "root": base,
                 "parent": None}]
        data += [{"id": a.name, "object": "model", "created": a.created, "owned_by": OWNER, "root": base,
                  "parent": base, "rank": a.rank, "workers": fleet.holders(a.name)}
                 for a in fleet.adapters() if tenancy.may_use(tenant, a.name)]
        return web.json_response({"object": "list", "data": data})

    async def health_check(self, request: web.Request) -> web.Response:
        status = self.health()
        return web.json_response(status, status=503 if status.get("status") == "unavailable" else 200)


def _trace_headers(request: web.Request) -> dict[str, str] | None:
    headers = {k: request.headers[k] for k in ("traceparent", "tracestate") if k in request.headers}
    return headers or None
