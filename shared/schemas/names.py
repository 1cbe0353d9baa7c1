"""Patterns for names that travel in messages (request ids, worker ids, adapters, subjects), the
string types that enforce them, and the opaque key under which worker state shows a request."""

import hashlib
from typing import Annotated

from msgspec import Meta

REQUEST_ID_PATTERN = r"[A-Za-z0-9._:~-]{1,128}"
WORKER_ID_PATTERN = r"[A-Za-z0-9_-]{1,64}"
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,255}"
SUBJECT_PATTERN = r"[^\s.*>]{1,256}(\.[^\s.*>]{1,256}){0,32}"
INSTANCE_PATTERN = r"[0-9a-f]{0,32}"
REQUEST_KEY_PATTERN = r"[0-9a-f]{16}"
PROFILE_DIGEST_PATTERN = r"[0-9a-f]{16}"
PROFILE_STATUS_PATTERN = rf"|pending|failed|{PROFILE_DIGEST_PATTERN}"  # WorkerState.profile


def whole(pattern: str) -> str:
    """``pattern`` anchored to the whole string: ``msgspec.Meta(pattern=...)`` searches, ours must match all."""
    return rf"^(?:{pattern})\Z"


RequestId = Annotated[str, Meta(pattern=whole(REQUEST_ID_PATTERN))]
WorkerId = Annotated[str, Meta(pattern=whole(WORKER_ID_PATTERN))]
Name = Annotated[str, Meta(pattern=whole(NAME_PATTERN))]  # adapters and tenants
Instance = Annotated[str, Meta(pattern=whole(INSTANCE_PATTERN))]
RequestKey = Annotated[str, Meta(pattern=whole(REQUEST_KEY_PATTERN))]
ProfileDigest = Annotated[str, Meta(pattern=whole(PROFILE_DIGEST_PATTERN))]
ProfileStatus = Annotated[str, Meta(pattern=whole(PROFILE_STATUS_PATTERN))]
Inbox = Annotated[str, Meta(max_length=1024, pattern=whole(SUBJECT_PATTERN))]
ModelName = Annotated[str, Meta(min_length=1, max_length=256)]


def request_key(request_id: str) -> str:
    """The opaque key worker state shows for ``request_id``: a blake2b digest (8 bytes, hex).

    Whoever placed the request can recognise it in ``state.*``; anyone else reading the
    state learns nothing they could cancel or act on.
    """
    return hashlib.blake2b(request_id.encode(), digest_size=8).hexdigest()
