"""NATS identities: each role's subject permissions, credentials, and the credential file format.

NATS is CaraServe's internal fabric, so every connection authenticates (user and password,
checked by nats-server's own ``authorization``) and may use only the subjects its role needs
(subjects under ``caraserve.v1.``; inboxes under ``_INBOX.<kind>.<name>``):

- gateway: publishes ``route``, ``worker.*.cancel``, ``adapters.>``, ``_INBOX.>`` (it streams to
  clients) and replies; subscribes ``generate``, ``cancel``, ``state.*`` and its own inboxes.
- scheduler: publishes ``worker.*.submit`` / ``.cancel`` / ``.profile``, ``_INBOX.gw.>`` (a
  no-capacity chunk) and replies; subscribes ``route``, ``state.*`` and its own inboxes.
- gpu_worker ``<id>``: publishes ``state.<id>``, ``_INBOX.gw.>`` (chunks) and replies; subscribes
  ``worker.<id>.>``, ``adapters.>``, ``cpu_prefill.<id>.>`` and its own inboxes.
- cpu_prefill ``<id>``: publishes ``cpu_prefill.<id>.hello`` / ``.heartbeat``; subscribes its own inboxes.
- client: publishes ``generate``, ``cancel``, ``adapters.list``; subscribes its own inboxes only.
- operator: everything (the local stack's tests and debugging only).

A connection's inbox prefix (nats-py's ``inbox_prefix``) puts all its reply inboxes under its
own ``_INBOX.<kind>.<name>``, so no identity can read another one's replies. The worker id
``*`` gives one shared worker role (``docker compose --scale``); the local stack makes one user
per worker id.

Credentials reach a service as a JSON file ``{"user", "password", "inbox_prefix"}`` (mode
0600; the ``nats_creds`` option of each service), or, in containers, as the variables
``CARASERVE_NATS_USER``, ``CARASERVE_NATS_PASSWORD`` (or ``CARASERVE_NATS_PASSWORD_FILE``, a
Docker secret) and ``CARASERVE_NATS_INBOX_PREFIX``. Passwords are 32 random bytes, generated
per run, and never logged (they are left out of every repr).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared import subjects

USER_ENV = "CARASERVE_NATS_USER"
PASSWORD_ENV = "CARASERVE_NATS_PASSWORD"
PASSWORD_FILE_ENV = "CARASERVE_NATS_PASSWORD_FILE"
INBOX_PREFIX_ENV = "CARASERVE_NATS_INBOX_PREFIX"
ENV_VARIABLES = (USER_ENV, PASSWORD_ENV, PASSWORD_FILE_ENV, INBOX_PREFIX_ENV)
PASSWORD_BYTES = 32


class CredentialsError(ConnectionError):
    """A credential file or the credential variables are missing, unreadable or malformed
    (a ConnectionError: the service cannot log in to NATS, and says so in one line)."""


@dataclass(frozen=True)
class Permissions:
    """What one NATS user may publish and subscribe to; ``allow_responses`` lets it answer requests."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    allow_responses: bool = False

    def to_server(self) -> dict:
        """nats-server's ``permissions`` map."""
        rendered: dict = {"publish": {"allow": list(self.publish)}, "subscribe": {"allow": list(self.subscribe)}}
        if self.allow_responses:
            rendered["allow_responses"] = True
        return rendered


@dataclass(frozen=True)
class Credentials:
    """How one identity logs in to NATS, and the inbox prefix its permissions allow."""

    user: str
    password: str = field(repr=False)
    inbox_prefix: str = ""

    def connect_options(self) -> dict[str, str]:
        """nats-py's ``connect()`` keyword arguments that log in as this identity."""
        options = {"user": self.user, "password": self.password}
        if self.inbox_prefix:
            options["inbox_prefix"] = self.inbox_prefix
        return options

    def to_json(self) -> str:
        return json.dumps({"user": self.user, "password": self.password, "inbox_prefix": self.inbox_prefix})

    @classmethod
    def from_json(cls, text: str) -> Credentials:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CredentialsError(f"credentials are not JSON: {exc.msg}") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) and data[k]
                                                 for k in ("user", "password")):
            raise CredentialsError("credentials need non-empty string fields user and password")
        prefix = data.get("inbox_prefix", "")
        if not isinstance(prefix, str):
            raise CredentialsError("inbox_prefix must be a string")
        return cls(data["user"], data["password"], prefix)


@dataclass(frozen=True)
class NatsUser:
    """One entry of nats-server's ``authorization.users``."""

    credentials: Credentials
    permissions: Permissions

    def to_server(self) -> dict:
        return {"user": self.credentials.user, "password": self.credentials.password,
                "permissions": self.permissions.to_server()}


# ---- roles -------------------------------------------------------------------------------------
def gateway_permissions(name: str) -> Permissions:
    """The gateway: the public API, routing, cancels, adapter administration, client streams."""
    return Permissions(
        publish=(subjects.ROUTE, subjects.any_worker("cancel"), subjects.ADAPTERS_ALL, f"{subjects.INBOX_ROOT}.>"),
        subscribe=(subjects.GENERATE, subjects.CANCEL, subjects.STATE_ALL,
                   _own_inboxes(subjects.GATEWAY_INBOXES, name)),
        allow_responses=True)


def scheduler_permissions(name: str) -> Permissions:
    """The scheduler: routes to workers and answers the gateway."""
    return Permissions(
        publish=(subjects.any_worker("submit"), subjects.any_worker("cancel"), subjects.any_worker("profile"),
                 f"{subjects.GATEWAY_INBOXES}.>"),
        subscribe=(subjects.ROUTE, subjects.STATE_ALL, _own_inboxes(subjects.SCHEDULER_INBOXES, name)),
        allow_responses=True)


def worker_permissions(worker_id: str) -> Permissions:
    """gpu_worker ``worker_id`` (``*``: any worker, one shared user for scaled containers)."""
    state = subjects.STATE_ALL if worker_id == "*" else subjects.state(worker_id)
    inbox_name = "any" if worker_id == "*" else worker_id
    return Permissions(
        publish=(state, f"{subjects.GATEWAY_INBOXES}.>"),
        subscribe=(subjects.worker_all(worker_id), subjects.ADAPTERS_ALL, subjects.cpu_prefill_all(worker_id),
                   _own_inboxes(subjects.WORKER_INBOXES, inbox_name)),
        allow_responses=True)


def cpu_prefill_permissions(worker_id: str) -> Permissions:
    """The CPU prefill pool of gpu_worker ``worker_id`` (``*``: any): its hello and heartbeats only."""
    inbox_name = "any" if worker_id == "*" else worker_id
    return Permissions(publish=(subjects.cpu_prefill_hello(worker_id), subjects.cpu_prefill_heartbeat(worker_id)),
                       subscribe=(_own_inboxes(subjects.CPU_PREFILL_INBOXES, inbox_name),))


def operator_permissions(name: str) -> Permissions:
    """Everything: for the local stack's tests and debugging only. It sees every message, so its
    credentials stay in the stack's private run directory and are never given to clients."""
    return Permissions(publish=(">",), subscribe=(">",), allow_responses=True)


def client_permissions(name: str) -> Permissions:
    """A NATS API client: the public subjects, and only its own inboxes."""
    return Permissions(publish=(subjects.GENERATE, subjects.CANCEL, subjects.ADAPTERS_LIST),
                       subscribe=(_own_inboxes(subjects.CLIENT_INBOXES, name),))


def _own_inboxes(kind: str, name: str) -> str:
    return f"{subjects.inbox_prefix(kind, name)}.>"


@dataclass(frozen=True)
class Role:
    """A kind of identity: where its inboxes live and what it may do."""

    inboxes: str
    permissions: Callable[[str], Permissions]


ROLES: dict[str, Role] = {
    "gateway": Role(subjects.GATEWAY_INBOXES, gateway_permissions),
    "scheduler": Role(subjects.SCHEDULER_INBOXES, scheduler_permissions),
    "gpu_worker": Role(subjects.WORKER_INBOXES, worker_permissions),
    "cpu_prefill": Role(subjects.CPU_PREFILL_INBOXES, cpu_prefill_permissions),
    "client": Role(subjects.CLIENT_INBOXES, client_permissions),
    "operator": Role(f"{subjects.INBOX_ROOT}.operator", operator_permissions),
}


def new_user(role: str, name: str) -> NatsUser:
    """A fresh identity ``name`` of ``role`` (user ``<role>-<name>``) with a random password."""
    spec = ROLES[role]
    inbox_name = "any" if name == "*" else name
    user = f"{role}-{inbox_name}"
    credentials = Credentials(user, secrets.token_hex(PASSWORD_BYTES), subjects.inbox_prefix(spec.inboxes, inbox_name))
    return NatsUser(credentials, spec.permissions(name))


# ---- files and variables -----------------------------------------------------------------------
def write_credentials(credentials: Credentials, path: Path) -> Path:
    """Write ``credentials`` to ``path`` readable by its owner only (0600, created that way)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # an existing file keeps its mode through O_CREAT
        out.write(credentials.to_json())
    return path


def read_credentials(path: str | Path) -> Credentials:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CredentialsError(f"cannot read NATS credentials {path}: {exc.strerror}") from None
    return Credentials.from_json(text)


def load_credentials(path: str = "", environ: Mapping[str, str] | None = None) -> Credentials | None:
    """The credentials a service connects with: the file ``path`` if given, else the
    ``CARASERVE_NATS_*`` variables, else None (anonymous: only for an open nats-server)."""
    if path:
        return read_credentials(path)
    env = os.environ if environ is None else environ
    user = env.get(USER_ENV, "")
    if not user:
        return None
    password = env.get(PASSWORD_ENV, "")
    if not password and env.get(PASSWORD_FILE_ENV):
        try:
            password = Path(env[PASSWORD_FILE_ENV]).read_text().strip()
        except OSError as exc:
            raise CredentialsError(f"cannot read {PASSWORD_FILE_ENV}: {exc.strerror}") from None
    if not password:
        raise CredentialsError(f"{USER_ENV} is set but neither {PASSWORD_ENV} nor {PASSWORD_FILE_ENV} is")
    return Credentials(user, password, env.get(INBOX_PREFIX_ENV, ""))
