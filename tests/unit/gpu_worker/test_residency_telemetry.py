"""Residency counters and the load-time histogram reach OTel metrics."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.gpu_worker.residency_telemetry import register_residency_metrics


def test_residency_report_is_exported_as_metrics():
    report = {"hits": 5, "misses": 2, "loads": 2, "evictions": 1, "load_failures": 0,
              "load_ms": {"le": {"10": 1, "100": 2, "+Inf": 2}, "count": 2, "sum_ms": 60.0},
              "adapters": [{"level": "device"}, {"level": "disk"}, {"level": "disk"}],
              "device": {"used_bytes": 1234}}
    reader = InMemoryMetricReader()
    register_residency_metrics(MeterProvider(metric_readers=[reader]).get_meter("t"), lambda: report, "w1")
    points = {}
    for rm in reader.get_metrics_data().resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    points[(metric.name, tuple(sorted(p.attributes.items())))] = p.value
    assert points[("caraserve.adapter.hits", (("worker", "w1"),))] == 5
    assert points[("caraserve.adapter.evictions", (("worker", "w1"),))] == 1
    assert points[("caraserve.adapter.load_ms", (("le", "100"), ("worker", "w1")))] == 2
    assert points[("caraserve.adapter.adapters", (("level", "disk"), ("worker", "w1")))] == 2
    assert points[("caraserve.adapter.device_bytes", (("worker", "w1"),))] == 1234
