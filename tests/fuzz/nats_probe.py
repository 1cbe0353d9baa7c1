"""Publish one raw NATS payload and judge what came back by the fuzz rules: no 5xx error, no hang.

A subject that answers (generate, adapters.*, route, worker submits) must answer within
``ANSWER_S``: with a typed error, a reply, or (generate) a chunk stream that ends with a final
chunk. An error whose code maps to a 5xx breaks the rules, as does silence or a reply that is
not msgpack. Subjects that do not answer (cancels, state) are only published.
"""

from __future__ import annotations

import asyncio

import msgpack
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared.schemas import ERROR_CODES

ANSWER_S = 15.0


def classify(data: bytes) -> tuple[str, bool]:
    """(label, final) for one message received on the reply inbox."""
    try:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException):
        return "unparseable reply", True
    if not isinstance(body, dict):
        return "unparseable reply", True
    kind = body.get("kind")
    error = body.get("error") if isinstance(body.get("error"), dict) else None
    code = error.get("code") if error else None
    if kind == "chunk":
        if body.get("finish_reason") is None:
            return "chunk", False
        return (f"chunk error {code}" if code else f"chunk {body['finish_reason']}"), True
    if kind == "error":
        return f"error {code}", True
    return f"reply {kind}", True


async def probe(nc: NATS, subject: str, payload: bytes, answers: bool) -> str:
    """Publish ``payload`` on ``subject`` with a fresh reply inbox; the outcome label."""
    if not answers:
        await nc.publish(subject, payload, reply=nc.new_inbox())
        await nc.flush()
        return "sent"
    ended = asyncio.Event()
    labels: list[str] = []

    async def on_msg(msg: Msg) -> None:
        label, final = classify(msg.data)
        if final and not ended.is_set():
            labels.append(label)
            ended.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_msg)
    try:
        await nc.publish(subject, payload, reply=inbox)
        await asyncio.wait_for(ended.wait(), ANSWER_S)
    except asyncio.TimeoutError:
        return "hang"
    finally:
        await sub.unsubscribe()
    return labels[0]


def broken(label: str) -> bool:
    """Whether an outcome label breaks a fuzz rule."""
    if label in ("hang", "unparseable reply"):
        return True
    code = label.rsplit(" ", 1)[-1]
    return "error" in label and ERROR_CODES.get(code, ("", 500))[1] >= 500
