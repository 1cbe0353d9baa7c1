"""Send one raw HTTP body and judge the answer by the fuzz rules: no 5xx, no hang, OpenAI-style errors.

A new connection per probe, raw bytes in (so invalid JSON and invalid UTF-8 reach the server
unchanged), the whole answer read back within ``ANSWER_S``. A streamed 200 must end with
``data: [DONE]`` and carry no server-error event.
"""

from __future__ import annotations

import http.client
import json
import socket
import time

from shared.schemas import ERROR_CODES

ANSWER_S = 15.0  # every request is answered (to its last byte) within this bound


def probe(port: int, path: str, body: bytes) -> str:
    """The outcome label of POSTing ``body`` to ``path``: a status, "hang", "no answer", or a rule broken."""
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=ANSWER_S)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
    except socket.timeout:
        return "hang"
    except (OSError, http.client.HTTPException) as exc:
        return f"no answer ({type(exc).__name__})"
    finally:
        conn.close()
    if time.monotonic() - start > ANSWER_S:
        return "hang"
    return judge(response.status, response.getheader("Content-Type") or "", data)


def judge(status: int, content_type: str, data: bytes) -> str:
    if status >= 500:
        return f"{status} {_error_code(data) or '(not OpenAI JSON)'}"
    if status >= 400:
        code = _error_code(data)
        return f"{status}" if code else f"{status} not OpenAI JSON"
    if "text/event-stream" in content_type:
        return _judge_stream(data)
    return "200" if _json_or_none(data) is not None else "200 not JSON"


def _judge_stream(data: bytes) -> str:
    events = [line[len(b"data: "):] for line in data.splitlines() if line.startswith(b"data: ")]
    if not events or events[-1] != b"[DONE]":
        return "200 stream without [DONE]"
    for event in events[:-1]:
        parsed = _json_or_none(event)
        if not isinstance(parsed, dict):
            return "200 stream with a bad event"
        if "error" in parsed:
            code = parsed["error"].get("code")
            status = ERROR_CODES.get(code, ("", 500))[1]
            return f"200 then {status} {code}" if status >= 500 else f"200 then {code}"
    return "200 stream"


def _json_or_none(data: bytes) -> object:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _error_code(data: bytes) -> str:
    parsed = _json_or_none(data)
    if not isinstance(parsed, dict) or not isinstance(parsed.get("error"), dict):
        return ""
    error = parsed["error"]
    return str(error.get("code")) if {"message", "type", "code"} <= error.keys() else ""


def broken(outcome: str) -> bool:
    """Whether an outcome label breaks a fuzz rule."""
    return (outcome.startswith("5") or outcome == "hang" or outcome.startswith("no answer")
            or "not OpenAI JSON" in outcome or "not JSON" in outcome or " then 5" in outcome
            or "without [DONE]" in outcome or "bad event" in outcome)
