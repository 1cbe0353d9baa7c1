"""A worker's performance profile on the bus: ``worker.<id>.profile`` (request/reply).

A worker publishes its profile's digest in every state (``WorkerState.profile``); a scheduler
that has not seen that digest asks for the profile once with :class:`ProfileRequest` and
gets the whole ``caraserve.profile/1`` JSON (``shared/perf_model.py``) in a
:class:`ProfileReply`. The reply names the digest it carries, which may be newer than the
one asked for (a quick profile superseded meanwhile).
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from shared.schemas.names import ProfileDigest, WorkerId
from shared.schemas.wire import Message

MAX_PROFILE_BYTES = 900_000  # under NATS's default 1 MiB payload


class ProfileRequest(Message, kw_only=True):
    """Asks a worker for its current profile (``digest``: the one the asker saw in its state)."""

    KIND = "profile_request"
    digest: ProfileDigest


class ProfileReply(Message, kw_only=True):
    """Worker ``worker_id``'s profile ``digest``: ``profile`` is its JSON text."""

    KIND = "profile_reply"
    worker_id: WorkerId
    digest: ProfileDigest
    profile: Annotated[str, Meta(min_length=2, max_length=MAX_PROFILE_BYTES)]
