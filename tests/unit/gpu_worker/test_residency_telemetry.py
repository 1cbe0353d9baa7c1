"""Residency counters and the load-time histogram reach OTel metrics."""

from __future__ import annotations

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from services.gpu_worker.residency.metrics import ResidencyCounters
from services.gpu_worker.residency.report import AdapterResidencyInfo, AssistReport, ResidencyReport
from services.gpu_worker.residency.telemetry import register_residency_metrics


def test_residency_report_is_exported_as_metrics():
    counters = ResidencyCounters(hits=5, misses=2, loads=2, evictions=1)
    for ms in (5.0, 55.0):
        counters.load_ms.observe(ms)
    adapters = [AdapterResidencyInfo(n, 8, level, False, 10, 0) for n, level in (("a", "device"), ("b", "disk"),
                                                                                 ("c", "disk"))]
    report = ResidencyReport("cpu_assist", adapters, None, 1234, [], [], 0, 0, 0, True, 1.0, 0.0, counters,
                             AssistReport(assisted=3, fallbacks=1, cpu_layers=90, pool_workers=2, pool_alive=2,
                                          pool_healthy=True))
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
    assert points[("caraserve.cpu_assist.assisted", (("worker", "w1"),))] == 3
    assert points[("caraserve.cpu_assist.fallbacks", (("worker", "w1"),))] == 1
    assert points[("caraserve.cpu_assist.cpu_layers", (("worker", "w1"),))] == 90
    assert points[("caraserve.cpu_assist.pool_healthy", (("worker", "w1"),))] == 1
