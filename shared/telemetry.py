"""OpenTelemetry for the services: tracer and meter per service, W3C trace context in NATS headers.

Configuration comes from the standard environment variables:

- ``OTEL_EXPORTER_OTLP_ENDPOINT`` (base URL; ``/v1/traces`` and ``/v1/metrics`` are appended) or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` (full URLs);
- ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``: ``otlp`` (default) or ``none``;
- ``OTEL_SDK_DISABLED=true`` turns everything off; ``OTEL_SERVICE_NAME`` overrides the name a
  service passes; ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_BSP_*`` and ``OTEL_METRIC_EXPORT_INTERVAL``
  are read by the SDK itself.

Export is OTLP over HTTP/protobuf. With no endpoint configured (or the exporter set to
``none``) the service gets the API's no-op tracer and meter, so instrumentation costs a
function call. Each service builds its own providers (not the global ones), so several
services in one process keep distinct ``service.name`` resources. A service that serves
Prometheus text passes a :class:`~shared.prometheus_endpoint.PrometheusExport`: its reader
joins the OTLP one (if any) on the same MeterProvider.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from shared.prometheus_endpoint import PrometheusExport

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                     5.0, 10.0, 30.0, 60.0)
_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass
class ExportSettings:
    """Where (and whether) a service exports traces and metrics, read from OTEL_* variables."""

    traces_endpoint: str | None = None
    metrics_endpoint: str | None = None
    service_name: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ExportSettings:
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls()
        base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip().rstrip("/")
        protocol = environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf").strip()
        if protocol != "http/protobuf":
            logger.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s is not supported; exporting http/protobuf", protocol)
        return cls(traces_endpoint=_endpoint(environ, "TRACES", base, "/v1/traces"),
                   metrics_endpoint=_endpoint(environ, "METRICS", base, "/v1/metrics"),
                   service_name=environ.get("OTEL_SERVICE_NAME", "").strip() or None)


def _endpoint(environ: Mapping[str, str], signal: str, base: str, path: str) -> str | None:
    if environ.get(f"OTEL_{signal}_EXPORTER", "otlp").strip().lower() == "none":
        return None
    explicit = environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "").strip()
    if explicit:
        return explicit
    return base + path if base else None


@dataclass
class ServingMetrics:
    """The serving instruments: latency histograms (seconds), queue depth and request counts."""

    ttft: metrics.Histogram
    tpot: metrics.Histogram
    e2e: metrics.Histogram
    queue_depth: metrics.UpDownCounter
    requests: metrics.Counter

    @classmethod
    def create(cls, meter: metrics.Meter) -> ServingMetrics:
        def histogram(name: str, description: str) -> metrics.Histogram:
            return meter.create_histogram(name, unit="s", description=description,
                                          explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S)
        return cls(
            ttft=histogram("caraserve.ttft", "time to first token"),
            tpot=histogram("caraserve.tpot", "time per output token after the first"),
            e2e=histogram("caraserve.e2e_latency", "end-to-end request latency"),
            queue_depth=meter.create_up_down_counter("caraserve.queue_depth", unit="{request}",
                                                     description="requests waiting or in flight"),
            requests=meter.create_counter("caraserve.requests", unit="{request}",
                                          description="finished requests by adapter and finish reason"),
        )


@dataclass
class Telemetry:
    """One service's tracer, meter and serving instruments; ``shutdown()`` flushes exporters."""

    service_name: str
    tracer: trace.Tracer
    meter: metrics.Meter
    metrics: ServingMetrics
    exporting: bool = False
    _providers: list[Any] = field(default_factory=list)
    prometheus: PrometheusExport | None = None  # the /metrics reader, when the service serves one

    def shutdown(self) -> None:
        """Flush and stop the exporters (a no-op without them)."""
        for provider in self._providers:
            provider.shutdown()
        self._providers.clear()


def setup_telemetry(service_name: str, environ: Mapping[str, str] | None = None,
                    prometheus: PrometheusExport | None = None) -> Telemetry:
    """Build ``service_name``'s tracer and meter from the OTEL_* variables in ``environ``, plus
    ``prometheus``'s reader and Views when given."""
    settings = ExportSettings.from_env(os.environ if environ is None else environ)
    name = settings.service_name or service_name
    providers: list[Any] = []
    tracer_provider: trace.TracerProvider = trace.NoOpTracerProvider()
    meter_provider: metrics.MeterProvider = metrics.NoOpMeterProvider()
    if settings.traces_endpoint or settings.metrics_endpoint or prometheus is not None:
        from opentelemetry.sdk.resources import Resource

        resource = Resource.create({"service.name": name})
        if settings.traces_endpoint:
            tracer_provider = _sdk_tracer_provider(resource, settings.traces_endpoint)
            providers.append(tracer_provider)
        if settings.metrics_endpoint or prometheus is not None:
            meter_provider = _sdk_meter_provider(resource, settings.metrics_endpoint, prometheus)
            providers.append(meter_provider)
        logger.info("%s exports telemetry: traces=%s metrics=%s", name, settings.traces_endpoint,
                    settings.metrics_endpoint)
    tracer = tracer_provider.get_tracer("caraserve")
    meter = meter_provider.get_meter("caraserve")
    return Telemetry(name, tracer, meter, ServingMetrics.create(meter), bool(providers), providers, prometheus)


def _sdk_tracer_provider(resource: Any, endpoint: str) -> Any:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


def _sdk_meter_provider(resource: Any, endpoint: str | None, prometheus: PrometheusExport | None) -> Any:
    """One MeterProvider with an OTLP reader (``endpoint``) and/or ``prometheus``'s reader."""
    from opentelemetry.sdk.metrics import MeterProvider

    readers: list[Any] = []
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=endpoint)))
    if prometheus is not None:
        readers.append(prometheus.reader)
    return MeterProvider(resource=resource, metric_readers=readers, views=prometheus.views if prometheus else ())


def inject_headers(headers: dict[str, str] | None = None) -> dict[str, str] | None:
    """``headers`` plus the current span's ``traceparent``/``tracestate`` (None if both are empty)."""
    carrier: dict[str, str] = dict(headers) if headers else {}
    _PROPAGATOR.inject(carrier)
    return carrier or None


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context carried in NATS ``headers`` (an empty context when there is none)."""
    return _PROPAGATOR.extract(headers or {})


def start_span(tracer: trace.Tracer, name: str, parent: otel_context.Context | None,
               attributes: Mapping[str, Any] | None = None,
               kind: trace.SpanKind = trace.SpanKind.SERVER) -> trace.Span:
    """Start span ``name`` under ``parent`` (not made current; end it yourself).

    With a no-op tracer this returns the parent's span itself (non-recording), so the trace
    context still propagates through a service that does not export.
    """
    if isinstance(tracer, trace.NoOpTracer):
        return trace.get_current_span(parent) if parent is not None else trace.INVALID_SPAN
    attrs = {k: v for k, v in attributes.items() if v is not None} if attributes else None
    return tracer.start_span(name, context=parent, kind=kind, attributes=attrs)


@contextlib.contextmanager
def span_from_headers(tracer: trace.Tracer, name: str, headers: Mapping[str, str] | None,
                      attributes: Mapping[str, Any] | None = None,
                      kind: trace.SpanKind = trace.SpanKind.SERVER) -> Iterator[trace.Span]:
    """Start span ``name`` as a child of the trace context in ``headers``, current until exit."""
    span = start_span(tracer, name, extract_context(headers) if headers else None, attributes, kind)
    with trace.use_span(span, end_on_exit=not isinstance(tracer, trace.NoOpTracer)) as current:
        yield current
