"""Backpressure: a bound on the requests in flight; past it a request is refused at once."""

from __future__ import annotations

from shared.schemas import ServiceError


class InflightLimiter:
    """Counts requests in flight up to ``limit``."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.count = 0

    def acquire(self) -> None:
        """Take a slot or raise ServiceError ``overloaded`` (HTTP 429) without waiting."""
        if self.count >= self.limit:
            raise ServiceError("overloaded", f"the server is overloaded ({self.limit} requests in flight); "
                                             "retry later")
        self.count += 1

    def release(self) -> None:
        if self.count <= 0:
            raise RuntimeError("release() without acquire()")
        self.count -= 1
