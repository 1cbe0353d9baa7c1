"""A pool of CPU prefill processes on one ring, each pinned to its own core where cores allow.

:class:`CpuPool` starts ``workers`` :mod:`~services.cpu_prefill.delta_worker` processes,
restarts any that died (:meth:`restart_dead`), and stops them all on :meth:`close`. It knows
nothing of NATS: the cpu_prefill service reports its health over NATS, and ``caraserve batch``
reports it to its in-process engine directly.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path

from shared.core_split import host_cores, pool_cores
from shared.parent_death import die_with_parent
from shared.shm_exchange import ExchangeRing, RingMismatchError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
STOP_GRACE_S = 3.0


class CpuPool:
    """``workers`` CPU prefill processes attached to ring ``ring_name``."""

    def __init__(self, ring_name: str, workers: int, cores: list[int] | None = None) -> None:
        self.ring_name, self.workers = ring_name, workers
        self.cores = cores or pool_cores(workers, host_cores())
        self._procs: list[subprocess.Popen | None] = [None] * workers
        self._ring: ExchangeRing | None = None  # read-only use: the processes' ready words

    def _spawn(self, index: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "services.cpu_prefill.delta_worker", "--ring", self.ring_name,
               "--index", str(index), "--core", str(self.cores[index])]
        return subprocess.Popen(cmd, cwd=ROOT, preexec_fn=die_with_parent(signal.SIGKILL))

    def start(self) -> None:
        """Start the processes (FileNotFoundError / RingMismatchError if the ring is not there)."""
        self._ring = ExchangeRing.attach(self.ring_name)
        if self._ring.geometry.num_cpu_workers != self.workers:
            raise RingMismatchError(f"ring {self.ring_name} is laid out for {self._ring.geometry.num_cpu_workers} CPU "
                                    f"workers, not {self.workers}")
        for i in range(self.workers):
            self._procs[i] = self._spawn(i)
        log.info("cpu_prefill pool: %d processes on %s (cores %s)", self.workers, self.ring_name, self.cores)

    @property
    def started(self) -> bool:
        return self._ring is not None

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None]

    def owner_alive(self) -> bool:
        """Whether the ring's owner (the gpu_worker) still runs; False before :meth:`start`. A worker
        killed with SIGKILL leaves its ring behind: the pool must not keep restarting processes on it."""
        return self._ring is not None and self._ring.owner_alive()

    def alive(self) -> int:
        """Processes running and attached to the ring (each marked itself ready with its pid)."""
        ready = self._ring.ready_pids() if self._ring is not None else []
        return sum(p is not None and p.poll() is None and ready[i] == p.pid for i, p in enumerate(self._procs))

    def restart_dead(self) -> list[int]:
        """Start again every process that exited; returns their indexes."""
        restarted = []
        for i, proc in enumerate(self._procs):
            if proc is not None and proc.poll() is not None:
                log.warning("cpu_prefill process %d (pid %d) exited with %s; restarting it", i, proc.pid,
                            proc.returncode)
                self._procs[i] = self._spawn(i)
                restarted.append(i)
        return restarted

    def close(self) -> None:
        """SIGTERM every process, SIGKILL what is left after STOP_GRACE_S, and reap them."""
        procs = [p for p in self._procs if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = [None] * self.workers
        if self._ring is not None:
            self._ring.close()
            self._ring = None
