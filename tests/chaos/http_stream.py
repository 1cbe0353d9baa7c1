"""One streaming HTTP completion, read to its end, with what the reliability suites judge it by.

:func:`stream_completion` POSTs a ``stream: true`` body to ``/v1/completions`` and reads the
SSE events until ``[DONE]``, the connection closing, or its time bound. It never raises for a
server's behaviour: a refused connection, a reset or a timeout are outcomes.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

from shared.schemas import ERROR_CODES


@dataclass
class HttpOutcome:
    """How one HTTP request ended."""

    status: int = 0  # 0: no HTTP answer (refused, reset or timed out before the status line)
    text: str = ""
    finish_reason: str | None = None
    error_code: str | None = None  # an error object's code, in the body or as an SSE event
    done: bool = False  # the stream ended with [DONE] (or a complete non-streaming body)
    closed: bool = False  # the connection ended without [DONE]
    timed_out: bool = False
    ended_at: float = 0.0
    events: list[dict] = field(default_factory=list)

    @property
    def server_error(self) -> bool:
        """A 5xx status, or an error event whose code maps to a 5xx."""
        coded = ERROR_CODES.get(self.error_code or "", ("", 0))[1]
        return self.status >= 500 or coded >= 500

    @property
    def ended(self) -> bool:
        return self.done or self.closed or (self.status != 0 and self.status != 200)

    def kind(self) -> str:
        """A short outcome label for the reliability counts."""
        if self.timed_out:
            return "hang"
        if self.status == 0:
            return "no_answer"
        if self.status != 200:
            return f"{self.status}" + (f" {self.error_code}" if self.error_code else "")
        if self.error_code:
            return f"200 then error {self.error_code}"
        return f"200 {self.finish_reason}" if self.done else "200 then closed"


async def stream_completion(session: aiohttp.ClientSession, url: str, body: dict, timeout_s: float,
                            outcome: HttpOutcome | None = None) -> HttpOutcome:
    """POST ``body`` (``stream`` forced on) to ``url``/v1/completions and read it to the end.

    The events land in ``outcome`` (a new one by default) as they arrive, so a caller can watch progress.
    """
    outcome = outcome if outcome is not None else HttpOutcome()
    try:
        await asyncio.wait_for(_read(session, url, {**body, "stream": True}, outcome), timeout_s)
    except asyncio.TimeoutError:
        outcome.timed_out = True
    except (aiohttp.ClientError, ConnectionError) as exc:
        outcome.closed = True
        outcome.events.append({"client_error": repr(exc)})
    outcome.ended_at = time.monotonic()
    return outcome


async def _read(session: aiohttp.ClientSession, url: str, body: dict, outcome: HttpOutcome) -> None:
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        outcome.status = resp.status
        if resp.status != 200:
            outcome.error_code = _error_code(await resp.read())
            return
        async for line in resp.content:
            _take_line(line.strip(), outcome)
            if outcome.done:
                return
        outcome.closed = True


def _take_line(line: bytes, outcome: HttpOutcome) -> None:
    if not line.startswith(b"data: "):
        return
    data = line[len(b"data: "):]
    if data == b"[DONE]":
        outcome.done = True
        return
    event = json.loads(data)
    outcome.events.append(event)
    if "error" in event:
        outcome.error_code = event["error"].get("code")
        return
    for choice in event.get("choices", []):
        outcome.text += choice.get("text") or ""
        outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason


def _error_code(body: bytes) -> str | None:
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "not_openai_json"
