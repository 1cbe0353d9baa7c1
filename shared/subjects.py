"""NATS subjects of CaraServe, all under ``caraserve.v1.``.

| subject | who serves it | payload |
| --- | --- | --- |
| ``generate`` | gateway (queue group) | GenerateRequest, chunks stream to the reply inbox |
| ``cancel`` | every gateway | CancelRequest |
| ``route`` | scheduler (queue group) | RouteRequest -> RouteReply |
| ``worker.<id>.submit`` | the worker ``<id>`` | WorkerSubmit -> SubmitAck |
| ``worker.<id>.cancel`` | the worker ``<id>`` | CancelRequest |
| ``worker.<id>.profile`` | the worker ``<id>`` | ProfileRequest -> ProfileReply |
| ``state.<id>`` | published by the worker ``<id>`` | WorkerState |
| ``adapters.load`` / ``.unload`` / ``.list`` | workers | AdapterLoad / AdapterUnload / AdapterListRequest |

Worker ids are single subject tokens: letters, digits, ``_`` and ``-``.

Reply inboxes live under ``_INBOX.<kind>.<name>``: one prefix per identity, so NATS permissions
(shared/nats_auth.py) can let each identity read only its own inboxes. Clients' generate requests
must not name an internal (gateway or scheduler) inbox as their reply subject.
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
ADAPTERS_ALL = f"{PREFIX}.adapters.>"

INBOX_ROOT = "_INBOX"
GATEWAY_INBOXES = f"{INBOX_ROOT}.gw"
SCHEDULER_INBOXES = f"{INBOX_ROOT}.sched"
WORKER_INBOXES = f"{INBOX_ROOT}.worker"
CLIENT_INBOXES = f"{INBOX_ROOT}.client"
CPU_PREFILL_INBOXES = f"{INBOX_ROOT}.cpu_prefill"
INTERNAL_INBOXES = (GATEWAY_INBOXES, SCHEDULER_INBOXES, WORKER_INBOXES, CPU_PREFILL_INBOXES)

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


def check_token(token: str) -> str:
    """Return ``token`` if it is one subject token ([A-Za-z0-9_-]{1,64}), else raise SubjectError."""
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise SubjectError(f"subject token must match [A-Za-z0-9_-]{{1,64}}, got {token!r}")
    return token


def worker_submit(worker_id: str) -> str:
    """The subject on which worker ``worker_id`` accepts WorkerSubmit requests."""
    return f"{PREFIX}.worker.{check_worker_id(worker_id)}.submit"


def worker_cancel(worker_id: str) -> str:
    """The subject on which worker ``worker_id`` accepts CancelRequest messages."""
    return f"{PREFIX}.worker.{check_worker_id(worker_id)}.cancel"


def worker_profile(worker_id: str) -> str:
    """The subject on which worker ``worker_id`` answers ProfileRequest with its profile."""
    return f"{PREFIX}.worker.{check_worker_id(worker_id)}.profile"


def worker_all(worker_id: str) -> str:
    """Every subject addressed to worker ``worker_id`` (``*`` for any worker)."""
    return f"{PREFIX}.worker.{_id_or_any(worker_id)}.>"


def any_worker(action: str) -> str:
    """``worker.*.<action>``: ``action`` addressed to any worker."""
    return f"{PREFIX}.worker.*.{check_token(action)}"


def cpu_prefill_all(worker_id: str) -> str:
    """Every control subject of the CPU prefill pool of worker ``worker_id`` (``*`` for any)."""
    return f"{PREFIX}.cpu_prefill.{_id_or_any(worker_id)}.>"


def cpu_prefill_hello(worker_id: str) -> str:
    """``cpu_prefill.<id>.hello``: a CPU prefill pool introduces itself to worker ``worker_id`` (request/reply)."""
    return f"{PREFIX}.cpu_prefill.{_id_or_any(worker_id)}.hello"


def cpu_prefill_heartbeat(worker_id: str) -> str:
    """``cpu_prefill.<id>.heartbeat``: the pool of worker ``worker_id`` says it is alive (request/reply)."""
    return f"{PREFIX}.cpu_prefill.{_id_or_any(worker_id)}.heartbeat"


def inbox_prefix(kind: str, name: str) -> str:
    """The inbox prefix of identity ``name`` under ``kind`` (one of the ``*_INBOXES`` roots)."""
    return f"{kind}.{check_token(name)}"


def is_internal_inbox(subject: str) -> bool:
    """True for an inbox of a gateway, scheduler or worker (never a client's reply subject)."""
    return any(subject == root or subject.startswith(root + ".") for root in INTERNAL_INBOXES)


def _id_or_any(worker_id: str) -> str:
    return worker_id if worker_id == "*" else check_worker_id(worker_id)


def state(worker_id: str) -> str:
    """The subject on which worker ``worker_id`` publishes its WorkerState."""
    return f"{_STATE_PREFIX}{check_worker_id(worker_id)}"


def worker_id_of_state(subject: str) -> str:
    """The worker id in a ``state.<id>`` subject; SubjectError for any other subject."""
    if not subject.startswith(_STATE_PREFIX):
        raise SubjectError(f"not a state subject: {subject!r}")
    return check_worker_id(subject[len(_STATE_PREFIX):])
