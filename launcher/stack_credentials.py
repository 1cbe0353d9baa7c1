"""The NATS identities of one local stack, generated per run (shared/nats_auth.py has the roles).

Every service of ``caraserve up`` gets its own user (one per scheduler replica, per worker id and
per worker's CPU prefill pool) with a fresh random password; the files live in ``<run dir>/nats/`` (directory 0700, files
0600) and reach each service as ``CARASERVE_NATS_CREDS``. ``--nats-client-creds FILE`` writes
one more identity per file: a NATS API client. The ``operator`` identity (every subject) is
for tests and debugging of the local stack only.
"""

from __future__ import annotations

from pathlib import Path

from shared.nats_auth import Credentials, NatsUser, new_user, write_credentials


class StackCredentials:
    """The users nats-server accepts, and the credential file of each service."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.directory.chmod(0o700)
        self._users: dict[str, NatsUser] = {}
        self._files: dict[str, Path] = {}

    @classmethod
    def generate(cls, directory: Path, schedulers: int, workers: int) -> StackCredentials:
        """Identities for the gateway, each scheduler replica and worker, and the operator."""
        creds = cls(directory)
        creds.add("gateway", "gateway", "gateway")
        for i in range(schedulers):
            creds.add(f"scheduler-{i}", "scheduler", f"scheduler-{i}")
        for i in range(workers):
            creds.add(f"worker-{i}", "gpu_worker", f"worker-{i}")
            creds.add(f"cpu_prefill-{i}", "cpu_prefill", f"worker-{i}")
        creds.add("operator", "operator", "local")
        return creds

    def add(self, key: str, role: str, name: str, path: Path | None = None) -> Path:
        """A new identity ``name`` of ``role``; its credentials go to ``path`` (default: the directory)."""
        user = new_user(role, name)
        self._users[key] = user
        self._files[key] = write_credentials(user.credentials, path or self.directory / f"{key}.json")
        return self._files[key]

    def add_clients(self, paths: tuple[str, ...]) -> None:
        """One NATS API client identity per path, written there."""
        for i, path in enumerate(paths):
            self.add(f"client-{i}", "client", str(i), Path(path))

    @property
    def users(self) -> tuple[NatsUser, ...]:
        return tuple(self._users.values())

    def file(self, key: str) -> Path:
        """The credential file of identity ``key`` (``gateway``, ``scheduler-0``, ``worker-1``, ...)."""
        return self._files[key]

    def credentials(self, key: str) -> Credentials:
        return self._users[key].credentials
