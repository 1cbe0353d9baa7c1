"""Residency counters and the adapter load-time histogram (for worker state and metrics)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

LOAD_MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


@dataclass
class LoadHistogram:
    """Cumulative histogram of adapter load times in milliseconds (Prometheus-style ``le`` buckets)."""

    bounds: tuple[float, ...] = LOAD_MS_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bucket, plus one for +Inf
    count: int = 0
    sum_ms: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, ms: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, ms)] += 1
        self.count += 1
        self.sum_ms += ms

    def to_dict(self) -> dict:
        """``{"le": {bound: cumulative count, ..., "+Inf": n}, "count": n, "sum_ms": s}``."""
        cumulative, running = {}, 0
        for bound, n in zip([*map(str, self.bounds), "+Inf"], self.counts):
            running += n
            cumulative[bound] = running
        return {"le": cumulative, "count": self.count, "sum_ms": round(self.sum_ms, 3)}


@dataclass
class ResidencyCounters:
    """Requests served from the device (hits) or not (misses), loads, evictions, failures."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    load_failures: int = 0
    load_ms: LoadHistogram = field(default_factory=LoadHistogram)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def to_dict(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": round(self.hit_rate, 6), "loads": self.loads,
                "evictions": self.evictions, "load_failures": self.load_failures, "load_ms": self.load_ms.to_dict()}
