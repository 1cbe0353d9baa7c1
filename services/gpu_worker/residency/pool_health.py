"""Whether this worker's CPU prefill pool is there: its hello, its heartbeats, its size.

The pool introduces itself with a :class:`~shared.schemas.cpu_prefill.PoolHello`; :meth:`welcome`
checks its exchange version and model geometry against the worker's ring and answers with
the ring to attach, or refuses with a clear ``invalid_request``. After that the pool sends
a heartbeat every ``heartbeat_s``; a pool that missed ``MISSED_BEATS`` of them, or whose
processes are not all alive, is unhealthy, and admission then lets no request be assisted.
Thread-safe: heartbeats arrive on the event loop, the step loop reads :meth:`healthy`.
"""

from __future__ import annotations

import logging
import threading
import time

from shared.schemas import ServiceError
from shared.schemas.cpu_prefill import PoolHeartbeat, PoolHello, PoolWelcome
from shared.shm_exchange import VERSION, RingGeometry

log = logging.getLogger(__name__)

MISSED_BEATS = 3


class PoolHealth:
    """The pool's last heartbeat, as the worker sees it."""

    def __init__(self, worker_id: str, ring_name: str, geometry: RingGeometry, heartbeat_s: float = 0.5,
                 clock=time.monotonic, cores: list[int] | None = None) -> None:
        self.worker_id, self.ring_name, self.geometry = worker_id, ring_name, geometry
        self.cores = cores  # the cores the pool's processes should take (None: their own choice)
        self.heartbeat_s, self._clock = heartbeat_s, clock
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._alive = 0
        self.beats = 0

    def welcome(self, hello: PoolHello) -> PoolWelcome:
        """Accept a pool's hello (ServiceError ``invalid_request`` if it cannot serve this ring)."""
        problem = self._mismatch(hello)
        if problem:
            log.warning("cpu_prefill pool (pid %d) refused: %s", hello.pid, problem)
            raise ServiceError("invalid_request", f"worker {self.worker_id} refuses this cpu_prefill pool: {problem}")
        log.info("cpu_prefill pool (pid %d) attached to %s with %d CPU workers", hello.pid, self.ring_name,
                 self.geometry.num_cpu_workers)
        return self._welcome()

    def _mismatch(self, hello: PoolHello) -> str:
        if hello.exchange_version != VERSION:
            return f"exchange version {hello.exchange_version}, the worker speaks {VERSION}"
        s = self.geometry.shape
        mine = (s.num_layers, s.hidden_size, s.intermediate_size, s.num_heads, s.num_kv_heads, s.head_dim)
        theirs = (hello.num_layers, hello.hidden_size, hello.intermediate_size, hello.num_heads, hello.num_kv_heads,
                  hello.head_dim)
        if mine != theirs:
            return (f"model geometry (layers, hidden, intermediate, heads, kv heads, head dim) {theirs} differs from "
                    f"the worker's {mine}: is the pool configured with another model?")
        if hello.workers not in (0, self.geometry.num_cpu_workers):
            return f"{hello.workers} CPU workers, the worker's ring expects {self.geometry.num_cpu_workers}"
        return ""

    def _welcome(self) -> PoolWelcome:
        return PoolWelcome(worker_id=self.worker_id, ring=self.ring_name, workers=self.geometry.num_cpu_workers,
                           heartbeat_s=self.heartbeat_s)

    def heartbeat(self, beat: PoolHeartbeat) -> PoolWelcome:
        """Record a heartbeat; the answer names the current ring (a pool on an old one re-attaches)."""
        if beat.ring == self.ring_name:
            self.beat(beat.alive)
        return self._welcome()

    def beat(self, alive: int) -> None:
        """The pool is there with ``alive`` running CPU processes (any thread; also a local pool's monitor)."""
        with self._lock:
            self._last, self._alive = self._clock(), alive
            self.beats += 1

    def healthy(self) -> bool:
        """A heartbeat within MISSED_BEATS intervals, with every CPU process alive."""
        return self.alive() >= self.geometry.num_cpu_workers

    def alive(self) -> int:
        """CPU processes alive at the last heartbeat (0 once the heartbeats stopped)."""
        with self._lock:
            fresh = self._clock() - self._last <= MISSED_BEATS * self.heartbeat_s
            return self._alive if fresh else 0


