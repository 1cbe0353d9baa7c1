"""A service's Prometheus endpoint: ``GET /metrics`` through OpenTelemetry's Prometheus exporter.

:class:`PrometheusExport` is OTel's ``PrometheusMetricReader`` on a ``CollectorRegistry`` of
its own (never prometheus_client's global ``REGISTRY``), so two services in one process, or
a service restarted in the same process, never collide; the reader unregisters itself when
the meter provider shuts down. :func:`setup_telemetry` adds its reader (next to the OTLP
reader, when one is configured) and its Views to the service's one MeterProvider.

Names: OTel instrument names cannot hold ``:``, so instruments that must be exposed under a
``namespace:name`` Prometheus name (vLLM's ``vllm:...``) are created as ``vllm.name`` and
renamed by a View (``renames``). The exporter then keeps the ``:``, turns other dots into
``_``, appends the unit's word (``s`` -> ``_seconds``) unless the name already ends with it,
and ``_total`` to counters. Scope labels (``otel_scope_*``) are off, so a metric carries
exactly the labels its instrument records.

Observable gauges forget attribute sets that their last callback did not report (a series
disappears), but the SDK keeps one empty slot per attribute set ever seen; the cardinality
limit for observable gauges is raised to :data:`GAUGE_CARDINALITY` so that label sets that
change over a long run (adapter lists) do not spill into the SDK's overflow series.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping

from aiohttp import web
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import ObservableGauge
from opentelemetry.sdk.metrics.view import View
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

logger = logging.getLogger(__name__)

GAUGE_CARDINALITY = 100_000
METRICS_PATH = "/metrics"


class PrometheusExport:
    """One service's Prometheus reader, its own registry and the Views that rename instruments."""

    def __init__(self, renames: Mapping[str, str] | None = None) -> None:
        """``renames`` maps an instrument name to the metric name it is exposed under."""
        self.registry = CollectorRegistry()
        self.reader = PrometheusMetricReader(scope_info_enabled=False, registry=self.registry,
                                             cardinality_limits={ObservableGauge: GAUGE_CARDINALITY})
        self.views = [View(instrument_name=source, name=target) for source, target in (renames or {}).items()]

    def text(self) -> bytes:
        """The current metrics in the Prometheus text format (runs the observable callbacks)."""
        return generate_latest(self.registry)


async def serve_metrics(export: PrometheusExport, host: str, port: int, stack: contextlib.AsyncExitStack) -> int:
    """Serve ``export`` on ``http://host:port/metrics`` until ``stack`` closes; returns the bound port."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=export.text(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get(METRICS_PATH, metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, host, port).start()
    bound = runner.addresses[0][1]
    logger.info("Prometheus metrics on http://%s:%d%s", host, bound, METRICS_PATH)
    return bound
