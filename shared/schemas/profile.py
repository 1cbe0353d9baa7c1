"""A worker's performance profile on the bus: ``worker.<id>.profile`` (request/reply).

A worker publishes its profile's digest in every state (``WorkerState.profile``); a scheduler
that has not seen that digest asks for the profile once with :class:`ProfileRequest` and
gets the whole ``caraserve.profile/1`` JSON (``shared/perf_model.py``) in a
:class:`ProfileReply`. The reply names the digest it carries, which may be newer than the
one asked for (a quick profile superseded meanwhile).
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.schemas.names import PROFILE_DIGEST_PATTERN, WORKER_ID_PATTERN
from shared.schemas.wire import Message, spec

MAX_PROFILE_BYTES = 900_000  # under NATS's default 1 MiB payload


@dataclass(kw_only=True)
class ProfileRequest(Message):
    """Asks a worker for its current profile (``digest``: the one the asker saw in its state)."""

    KIND = "profile_request"
    digest: str = spec(pattern=PROFILE_DIGEST_PATTERN)


@dataclass(kw_only=True)
class ProfileReply(Message):
    """Worker ``worker_id``'s profile ``digest``: ``profile`` is its JSON text."""

    KIND = "profile_reply"
    worker_id: str = spec(pattern=WORKER_ID_PATTERN)
    digest: str = spec(pattern=PROFILE_DIGEST_PATTERN)
    profile: str = spec(min_len=2, max_len=MAX_PROFILE_BYTES)
