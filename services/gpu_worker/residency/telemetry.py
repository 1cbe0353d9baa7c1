"""Adapter-residency metrics of a worker, read from its AdapterManager's ``residency()`` report.

Counters ``caraserve.adapter.{hits,misses,loads,evictions,load_failures}``, the cumulative
load-time histogram ``caraserve.adapter.load_ms`` (one observation per ``le`` bound) and the
gauges ``caraserve.adapter.device_bytes`` / ``caraserve.adapter.adapters`` (adapters by
level). All are observable instruments, read when the metric reader collects.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

COUNTERS = ("hits", "misses", "loads", "evictions", "load_failures")


def register_residency_metrics(meter: Meter, report: Callable[[], dict], worker_id: str) -> None:
    """Observe ``report()`` (a TieredAdapters-style residency dict) as OTel instruments."""
    labels = {"worker": worker_id}

    def counter(key: str):
        def observe(options: CallbackOptions):
            yield Observation(report().get(key, 0), labels)
        return observe

    def load_histogram(options: CallbackOptions):
        for bound, count in report().get("load_ms", {}).get("le", {}).items():
            yield Observation(count, {**labels, "le": bound})

    def levels(options: CallbackOptions):
        for level, n in Counter(a["level"] for a in report().get("adapters", [])).items():
            yield Observation(n, {**labels, "level": level})

    def device_bytes(options: CallbackOptions):
        yield Observation(report().get("device", {}).get("used_bytes", 0), labels)

    for key in COUNTERS:
        meter.create_observable_counter(f"caraserve.adapter.{key}", [counter(key)], unit="1")
    meter.create_observable_counter("caraserve.adapter.load_ms", [load_histogram], unit="1",
                                    description="adapter loads that took at most `le` ms (cumulative)")
    meter.create_observable_gauge("caraserve.adapter.adapters", [levels], description="adapters by residency level")
    meter.create_observable_gauge("caraserve.adapter.device_bytes", [device_bytes], unit="By")
