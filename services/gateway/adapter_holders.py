"""Which workers hold each adapter, and in which tier, from their ``state.<id>`` and ``adapters.*`` answers.

Each worker's report is its complete adapter list, so a report replaces what that worker
held before. A worker that has not reported for ``timeout_s`` holds nothing (it is presumed
lost). ``GET /v1/models`` shows the holders of every adapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from shared.schemas import AdapterInfo


class AdapterHolders:
    """adapter name -> {worker id: level}, as last reported by each worker."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s, self.clock = timeout_s, clock
        self._reports: dict[str, tuple[float, dict[str, str]]] = {}  # worker -> (when, name -> level)

    def observe(self, worker_id: str, adapters: Iterable[AdapterInfo]) -> None:
        """Record ``worker_id``'s complete adapter list."""
        self._reports[worker_id] = (self.clock(), {a.name: a.level for a in adapters})

    def forget(self, name: str) -> None:
        """``name`` was unloaded everywhere."""
        for _, held in self._reports.values():
            held.pop(name, None)

    def holders(self, name: str) -> list[dict[str, str]]:
        """``[{"worker": id, "level": device|host|disk}, ...]`` of live workers holding ``name``."""
        now = self.clock()
        return [{"worker": worker, "level": held[name]} for worker, (seen, held) in sorted(self._reports.items())
                if name in held and now - seen <= self.timeout_s]
