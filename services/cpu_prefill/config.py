"""Configuration of the cpu_prefill service (the pool of one gpu_worker)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.bus import DEFAULT_NATS_URL
from shared.config import option, require
from shared.schemas.names import WORKER_ID_PATTERN


@dataclass
class PoolConfig:
    """Which worker the pool serves, how it reaches NATS, and its size."""

    worker_id: str = option("worker-0", "the gpu_worker this pool serves (same host, same IPC namespace)")
    nats_url: str = option(DEFAULT_NATS_URL, "NATS server URL, or a comma-separated list of cluster nodes")
    nats_creds: str = option("", "NATS credentials file (JSON user, password, inbox_prefix; mode 0600); "
                                 "empty: CARASERVE_NATS_USER/PASSWORD, else anonymous")
    model: str = option("default", "the worker's model (HF Llama directory or 'default'): its geometry is "
                                   "checked against the worker's at hello")
    cpu_prefill_workers: int = option(0, "CPU processes; 0 = as many as the worker's ring expects")
    heartbeat_s: float = option(0.5, "seconds between heartbeats (the pool beats at the shorter of this and the "
                                      "worker's interval, so the worker never counts it missing)")
    hello_timeout_s: float = option(600.0, "give up when no worker answered the hello for this long")

    def __post_init__(self) -> None:
        require(re.fullmatch(WORKER_ID_PATTERN, self.worker_id) is not None,
                f"worker_id {self.worker_id!r} must match {WORKER_ID_PATTERN}")
        require(bool(self.nats_url), "nats_url must not be empty")
        require(0 <= self.cpu_prefill_workers <= 256, "cpu_prefill_workers must be in [0, 256]")
        require(0.01 <= self.heartbeat_s <= 60.0, "heartbeat_s must be in [0.01, 60]")
        require(self.hello_timeout_s > 0, "hello_timeout_s must be > 0")
