"""Residency counters and the load-time histogram."""

from __future__ import annotations

from services.gpu_worker.residency.metrics import LoadHistogram, ResidencyCounters


def test_histogram_is_cumulative():
    hist = LoadHistogram(bounds=(1, 10, 100))
    for ms in (0.5, 1.0, 5, 50, 500):
        hist.observe(ms)
    d = hist.to_dict()
    assert d["le"] == {"1": 2, "10": 3, "100": 4, "+Inf": 5}
    assert d["count"] == 5 and d["sum_ms"] == 556.5


def test_hit_rate():
    counters = ResidencyCounters()
    assert counters.hit_rate == 0.0
    counters.hits, counters.misses = 3, 1
    assert counters.to_dict()["hit_rate"] == 0.75
