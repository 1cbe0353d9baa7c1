"""A CPU prefill pool run by the launcher itself (``caraserve batch --cold-start cpu_assist``).

Without NATS, the pool's heartbeat is this module's monitor thread: every ``HEARTBEAT_S`` it
restarts any CPU process that died and tells the engine's :class:`PoolHealth` how many are
alive. The launcher is the one place allowed to wire two services together.
"""

from __future__ import annotations

import logging
import threading
import time

from services.cpu_prefill.pool import CpuPool
from services.gpu_worker.residency.pool_health import PoolHealth

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.1
READY_TIMEOUT_S = 300.0  # a fresh host builds the native kernel first


class LocalPool:
    """Starts a pool on the engine's ring and keeps its health current until closed."""

    def __init__(self, health: PoolHealth) -> None:
        self.health = health
        self.pool = CpuPool(health.ring_name, health.geometry.num_cpu_workers, health.cores)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._monitor, name="cpu-prefill-monitor", daemon=True)

    def __enter__(self) -> "LocalPool":
        self.pool.start()
        self.health.beat(self.pool.alive())
        self._thread.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.health.healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the CPU prefill pool did not start within {READY_TIMEOUT_S:.0f} s")
            time.sleep(0.05)
        log.info("cpu_prefill pool of %d processes ready on %s", self.pool.alive(), self.health.ring_name)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.pool.close()

    def _monitor(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self.pool.restart_dead()
            self.health.beat(self.pool.alive())
