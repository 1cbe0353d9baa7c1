"""Backpressure: a bound on the requests in flight; past it a request is refused at once.

The bound is ``min(max_inflight, capacity)``, where ``capacity`` is what the live workers can
hold right now: each holds ``max_batch_size`` running requests plus ``max_queued`` queued ones
(a worker that reports ``max_queued`` 0 queues nothing past its batch). A request past the
bound gets 429 ``overloaded`` at once rather than waiting in a queue it may never leave;
with no live worker at all it gets 503 ``no_capacity``. The count is this gateway's own:
replicas of the gateway each admit up to the bound.
"""

from __future__ import annotations

from shared.schemas import ServiceError


class InflightLimiter:
    """Counts requests in flight up to ``min(limit, capacity)``."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.count = 0

    def bound(self, capacity: int) -> int:
        """How many requests may be in flight when the live workers hold ``capacity``."""
        return min(self.limit, capacity)

    def can_acquire(self, capacity: int) -> bool:
        return self.count < self.bound(capacity)

    def acquire(self, capacity: int) -> None:
        """Take a slot, or raise ServiceError without waiting: ``no_capacity`` (HTTP 503) when no worker
        is live (``capacity`` 0), else ``overloaded`` (HTTP 429) past the bound."""
        if capacity <= 0:
            raise ServiceError("no_capacity", "no worker is available; retry later")
        if not self.can_acquire(capacity):
            raise ServiceError("overloaded", f"the server is overloaded ({self.count} requests in flight, "
                                             f"room for {self.bound(capacity)}); retry later")
        self.count += 1

    def release(self) -> None:
        if self.count <= 0:
            raise RuntimeError("release() without acquire()")
        self.count -= 1
