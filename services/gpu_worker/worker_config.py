"""Configuration of the gpu_worker service (the engine and residency have their own)."""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from shared.bus import DEFAULT_NATS_URL
from shared.config import option, require
from shared.schemas.names import WORKER_ID_PATTERN

HOSTNAME = "hostname"


def host_worker_id() -> str:
    """A worker id from this host's name (a container's is unique): its first label, with any
    character a subject token cannot hold replaced by ``-``."""
    label = socket.gethostname().split(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "-", label)[:64] or "worker"


@dataclass
class WorkerConfig:
    """Identity, bus and model of one gpu_worker."""

    worker_id: str = option("worker-0", "this worker's id (subjects worker.<id>.* and state.<id>); 'hostname' "
                                        "or empty: this host's name (unique per container with --scale)")
    nats_url: str = option(DEFAULT_NATS_URL, "NATS server URL, or a comma-separated list of cluster nodes")
    nats_creds: str = option("", "NATS credentials file (JSON user, password, inbox_prefix; mode 0600); "
                                 "empty: CARASERVE_NATS_USER/PASSWORD, else anonymous")
    model: str = option("default", "HF Llama directory, or 'default' for SmolLM2-135M-Instruct")
    model_name: str = option("", "the base model's public name (default: the directory name)")
    adapters: tuple[str, ...] = option((), "adapters to register at start, as NAME=DIR", default_factory=tuple)
    state_interval_s: float = option(0.1, "publish state.<id> at least this often")
    grace_s: float = option(5.0, "on shutdown, how long running requests may finish")
    profile: str = option("", "this worker's performance profile JSON (checked against its model, device, dtype "
                              "and backend); empty: find it in the profile cache, or make a quick one")
    auto_profile: bool = option(True, "with no cached profile, make a quick one at start (serving meanwhile; "
                                      "about a minute on a 2-core CPU host)")
    max_queued: int = option(64, "requests held queued beyond max_batch_size running; a submit past both is "
                                 "refused as overloaded")
    metrics_port: int = option(0, "serve Prometheus text (vLLM's metric names included) on "
                                  "http://METRICS_HOST:PORT/metrics; 0 = off")
    metrics_host: str = option("127.0.0.1", "the /metrics listen address")

    def __post_init__(self) -> None:
        if self.worker_id in ("", HOSTNAME):
            self.worker_id = host_worker_id()
        require(re.fullmatch(WORKER_ID_PATTERN, self.worker_id) is not None,
                f"worker_id {self.worker_id!r} must match {WORKER_ID_PATTERN}")
        require(bool(self.nats_url), "nats_url must not be empty")
        require(self.max_queued >= 0, f"max_queued must be >= 0, got {self.max_queued}")
        require(0 <= self.metrics_port <= 65535, f"metrics_port must be 0 (off) or a port, got {self.metrics_port}")
        require(0 < self.state_interval_s <= 1.0, "state_interval_s must be in (0, 1]")
        require(self.grace_s >= 0, "grace_s must be >= 0")
        for spec in self.adapters:
            require("=" in spec and all(spec.partition("=")[::2]), f"adapter {spec!r} must be NAME=DIR")

    def adapter_paths(self) -> dict[str, str]:
        return dict(spec.split("=", 1) for spec in self.adapters)
