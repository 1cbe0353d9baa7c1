"""Adapter-residency metrics of a worker, read from its residency's typed report.

Counters ``caraserve.adapter.{hits,misses,loads,evictions,load_failures}``, the cumulative
load-time histogram ``caraserve.adapter.load_ms`` (one observation per ``le`` bound), the
gauges ``caraserve.adapter.device_bytes`` / ``caraserve.adapter.adapters`` (adapters by
level), and CPU-assisted prefill: counters ``caraserve.cpu_assist.{assisted,fallbacks,cpu_layers}``
and gauges ``caraserve.cpu_assist.pool_workers`` / ``pool_alive`` / ``pool_healthy``. All are
observable instruments, read when the metric reader collects.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from services.gpu_worker.residency.report import ResidencyReport

COUNTERS = ("hits", "misses", "loads", "evictions", "load_failures")


ASSIST_COUNTERS = ("assisted", "fallbacks", "cpu_layers")
ASSIST_GAUGES = ("pool_workers", "pool_alive", "pool_healthy")


def register_residency_metrics(meter: Meter, report: Callable[[], ResidencyReport], worker_id: str) -> None:
    """Observe ``report()`` as OTel instruments."""
    labels = {"worker": worker_id}

    def counter(key: str):
        def observe(options: CallbackOptions):
            yield Observation(getattr(report().counters, key), labels)
        return observe

    def assist(key: str):
        def observe(options: CallbackOptions):
            yield Observation(int(getattr(report().assist, key)), labels)
        return observe

    def load_histogram(options: CallbackOptions):
        for bound, count in report().counters.load_ms.to_dict()["le"].items():
            yield Observation(count, {**labels, "le": bound})

    def levels(options: CallbackOptions):
        for level, n in Counter(a.level for a in report().adapters).items():
            yield Observation(n, {**labels, "level": level})

    def device_bytes(options: CallbackOptions):
        yield Observation(report().device_used_bytes, labels)

    for key in COUNTERS:
        meter.create_observable_counter(f"caraserve.adapter.{key}", [counter(key)], unit="1")
    meter.create_observable_counter("caraserve.adapter.load_ms", [load_histogram], unit="1",
                                    description="adapter loads that took at most `le` ms (cumulative)")
    meter.create_observable_gauge("caraserve.adapter.adapters", [levels], description="adapters by residency level")
    meter.create_observable_gauge("caraserve.adapter.device_bytes", [device_bytes], unit="By")
    for key in ASSIST_COUNTERS:
        meter.create_observable_counter(f"caraserve.cpu_assist.{key}", [assist(key)], unit="1")
    for key in ASSIST_GAUGES:
        meter.create_observable_gauge(f"caraserve.cpu_assist.{key}", [assist(key)])
