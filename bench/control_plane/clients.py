"""The control-plane benchmark's clients: timed NATS and HTTP requests, and an open-loop NATS load.

Every timestamp is wall-clock nanoseconds (``time.time_ns()``), the clock the services stamp
their spans with, so a client's timings line up with the spans of the same request.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared import subjects
from shared.schemas import Chunk, GenerateRequest, SchemaError


@dataclass
class Timed:
    """One request as its client saw it: sent, first token, final chunk."""

    request_id: str
    sent_ns: int = 0
    first_ns: int | None = None
    final_ns: int | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.final_ns is not None and self.finish_reason in ("length", "stop")


class ReplyRouter:
    """One wildcard inbox subscription for many requests; each request waits for its final chunk."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.prefix = f"_INBOX.bench.{uuid.uuid4().hex}"
        self._open: dict[str, tuple[Timed, asyncio.Future]] = {}

    async def start(self) -> ReplyRouter:
        await self.nc.subscribe(f"{self.prefix}.*", cb=self._on_msg)
        await self.nc.flush()
        return self

    def open(self, request_id: str) -> tuple[str, Timed, asyncio.Future]:
        """The inbox for ``request_id``, its record and a future done at its final chunk."""
        timed, done = Timed(request_id), asyncio.get_running_loop().create_future()
        self._open[request_id] = (timed, done)
        return f"{self.prefix}.{request_id}", timed, done

    async def _on_msg(self, msg: Msg) -> None:
        now = time.time_ns()
        entry = self._open.get(msg.subject.rsplit(".", 1)[-1])
        if entry is None:
            return
        timed, done = entry
        try:
            chunk = Chunk.decode(msg.data)
        except SchemaError as exc:
            timed.error = f"bad chunk: {exc}"
            chunk = Chunk(request_id=timed.request_id, index=0, finish_reason="error")
        if timed.first_ns is None and chunk.token_ids:
            timed.first_ns = now
        if chunk.final:
            timed.final_ns, timed.finish_reason = now, chunk.finish_reason
            if chunk.error is not None:
                timed.error = chunk.error.code
            del self._open[timed.request_id]
            if not done.done():
                done.set_result(timed)


async def nats_request(nc: NATS, router: ReplyRouter, request: GenerateRequest) -> tuple[Timed, asyncio.Future]:
    """Publish ``request`` (its payload encoded before the clock starts); its record and final future."""
    payload = request.encode()
    inbox, timed, done = router.open(request.request_id or "")
    timed.sent_ns = time.time_ns()
    await nc.publish(subjects.GENERATE, payload, reply=inbox)
    return timed, done


async def nats_sequential(nc: NATS, router: ReplyRouter, requests: list[GenerateRequest],
                          timeout_s: float) -> list[Timed]:
    """One request at a time, each after the previous one's final chunk (no queueing anywhere)."""
    out = []
    for request in requests:
        timed, done = await nats_request(nc, router, request)
        try:
            await asyncio.wait_for(done, timeout_s)
        except asyncio.TimeoutError:
            timed.finish_reason, timed.error = "error", "timeout"
        out.append(timed)
    return out


async def http_streamed(session: aiohttp.ClientSession, url: str, body: dict) -> Timed:
    """A streamed completion over HTTP; the first SSE event carries the first token."""
    payload = json.dumps(body).encode()
    timed = Timed("")
    timed.sent_ns = time.time_ns()
    async with session.post(url, data=payload, headers={"Content-Type": "application/json"}) as response:
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            now = time.time_ns()
            if line.strip() == b"data: [DONE]":
                timed.final_ns = now
                break
            event = json.loads(line[6:])
            if "error" in event:
                timed.error, timed.finish_reason, timed.final_ns = event["error"].get("code"), "error", now
                break
            timed.first_ns = timed.first_ns or now
            timed.request_id = event["id"]
            timed.finish_reason = event["choices"][0]["finish_reason"] or timed.finish_reason
    if response.status != 200:
        timed.error, timed.finish_reason = f"http {response.status}", "error"
    return timed


async def http_sequential(http_url: str, bodies: list[dict], timeout_s: float) -> list[Timed]:
    url = f"{http_url}/v1/completions"
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        return [await http_streamed(session, url, body) for body in bodies]


@dataclass
class LoadRun:
    """An open-loop run: the offered rate, every request's timing, and when sending began and ended."""

    rate: float
    duration_s: float
    started_ns: int
    sent_until_ns: int
    requests: list[Timed]


async def open_loop(nc: NATS, router: ReplyRouter, make: Callable[[int], GenerateRequest], rate: float,
                    duration_s: float, drain_s: float) -> LoadRun:
    """Send ``rate`` requests per second for ``duration_s`` on a fixed schedule, whatever the replies.

    Waits up to ``drain_s`` after the last send for the stragglers; one still open then counts
    as a timeout error.
    """
    count = max(1, int(rate * duration_s))
    sent: list[tuple[Timed, asyncio.Future]] = []
    loop = asyncio.get_running_loop()
    start, started_ns = loop.time(), time.time_ns()
    for i in range(count):
        delay = start + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        sent.append(await nats_request(nc, router, make(i)))
    sent_until_ns = time.time_ns()
    await asyncio.wait([done for _, done in sent], timeout=drain_s)
    for timed, done in sent:
        if not done.done():
            timed.finish_reason, timed.error = "error", "timeout"
    return LoadRun(rate, duration_s, started_ns, sent_until_ns, [timed for timed, _ in sent])
