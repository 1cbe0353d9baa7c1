"""NATS subjects of CaraServe, all under ``caraserve.v1.``.

| subject | who serves it | payload |
| --- | --- | --- |
| ``generate`` | gateway (queue group) | GenerateRequest, chunks stream to the reply inbox |
| ``cancel`` | every gateway | CancelRequest |
| ``route`` | scheduler (queue group) | RouteRequest -> RouteReply |
| ``worker.<id>.submit`` | the worker ``<id>`` | WorkerSubmit -> SubmitAck |
| ``worker.<id>.cancel`` | the worker ``<id>`` | CancelRequest |
| ``state.<id>`` | published by the worker ``<id>`` | WorkerState |
| ``adapters.load`` / ``.unload`` / ``.list`` | workers | AdapterLoad / AdapterUnload / AdapterListRequest |

Worker ids are single subject tokens: letters, digits, ``_`` and ``-``.
"""

from __future__ import annotations

import re

PREFIX = "caraserve.v1"

GENERATE = f"{PREFIX}.generate"
CANCEL = f"{PREFIX}.cancel"
ROUTE = f"{PREFIX}.route"
STATE_ALL = f"{PREFIX}.state.*"
ADAPTERS_LOAD = f"{PREFIX}.adapters.load"
ADAPTERS_UNLOAD = f"{PREFIX}.adapters.unload"
ADAPTERS_LIST = f"{PREFIX}.adapters.list"

GATEWAY_QUEUE = "caraserve-gateway"
SCHEDULER_QUEUE = "caraserve-scheduler"

_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_STATE_PREFIX = f"{PREFIX}.state."


class SubjectError(ValueError):
    """A subject or worker id is not well formed."""


def check_worker_id(worker_id: str) -> str:
    """Return ``worker_id`` if it is a valid single subject token, else raise SubjectError."""
    if not isinstance(worker_id, str) or not _TOKEN.fullmatch(worker_id):
        raise SubjectError(f"worker id must match [A-Za-z0-9_-]{{1,64}}, got {worker_id!r}")
    return worker_id


def worker_submit(worker_id: str) -> str:
    """The subject on which worker ``worker_id`` accepts WorkerSubmit requests."""
    return f"{PREFIX}.worker.{check_worker_id(worker_id)}.submit"


def worker_cancel(worker_id: str) -> str:
    """The subject on which worker ``worker_id`` accepts CancelRequest messages."""
    return f"{PREFIX}.worker.{check_worker_id(worker_id)}.cancel"


def state(worker_id: str) -> str:
    """The subject on which worker ``worker_id`` publishes its WorkerState."""
    return f"{_STATE_PREFIX}{check_worker_id(worker_id)}"


def worker_id_of_state(subject: str) -> str:
    """The worker id in a ``state.<id>`` subject; SubjectError for any other subject."""
    if not subject.startswith(_STATE_PREFIX):
        raise SubjectError(f"not a state subject: {subject!r}")
    return check_worker_id(subject[len(_STATE_PREFIX):])
