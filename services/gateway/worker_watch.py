"""Which workers are alive, from their ``state.<id>`` heartbeats, and who to tell when one goes quiet.

A request streaming from a worker registers a callback; when that worker's last state is
older than ``timeout_s`` (or it was never heard from for that long after the request was
placed) the callback fires once, and the request is re-routed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.msg import Msg

from shared.schemas import WorkerState

logger = logging.getLogger(__name__)


@dataclass
class _Watcher:
    worker_id: str
    since: float
    on_lost: Callable[[], None]


class WorkerWatch:
    """Last-seen times of workers and the requests watching them."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self._last_seen: dict[str, float] = {}
        self._watchers: dict[int, _Watcher] = {}
        self._ids = itertools.count()

    def on_state(self, state: WorkerState, msg: Msg) -> None:
        self._last_seen[state.worker_id] = self.clock()

    def live_workers(self) -> list[str]:
        now = self.clock()
        return sorted(w for w, seen in self._last_seen.items() if now - seen <= self.timeout_s)

    def is_lost(self, worker_id: str, since: float, now: float) -> bool:
        """Whether ``worker_id``, serving a request placed at ``since``, is presumed gone."""
        seen = self._last_seen.get(worker_id)
        reference = since if seen is None else max(seen, since)
        return now - reference > self.timeout_s

    def watch(self, worker_id: str, on_lost: Callable[[], None]) -> int:
        handle = next(self._ids)
        self._watchers[handle] = _Watcher(worker_id, self.clock(), on_lost)
        return handle

    def unwatch(self, handle: int) -> None:
        self._watchers.pop(handle, None)

    def sweep(self) -> None:
        """Fire (and drop) the watchers of workers presumed lost."""
        now = self.clock()
        for handle, watcher in list(self._watchers.items()):
            if self.is_lost(watcher.worker_id, watcher.since, now):
                del self._watchers[handle]
                logger.warning("worker %s went quiet; its requests are re-routed", watcher.worker_id)
                watcher.on_lost()

    async def run(self) -> None:
        """Sweep a few times per timeout, forever."""
        while True:
            await asyncio.sleep(self.timeout_s / 4)
            self.sweep()
