"""Traces and metrics reach a real OTLP collector (rotel-agent); one request is one trace."""

from __future__ import annotations

import contextlib
import time

import aiohttp
import pytest

from shared import subjects
from shared.schemas import AdapterInfo, Chunk, GenerateRequest
from shared.telemetry import ExportSettings, setup_telemetry
from tests.service.helpers import client, start_gateway, start_scheduler, start_worker, wait_until
from tests.service.rotel import RotelCollector, SpanRecord, parse_spans

pytestmark = pytest.mark.timeout(60)

OTEL_VARS = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_SERVICE_NAME",
             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL")


@pytest.fixture
def collector(tmp_path, monkeypatch):
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    with RotelCollector(tmp_path) as running:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", running.endpoint)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "200")
        yield running


def by_name(spans: list[SpanRecord], name: str) -> list[SpanRecord]:
    return [s for s in spans if s.name == name]


async def run_requests(nats_url: str, model_dir, traceparent: str) -> None:
    """A NATS request and an HTTP request (with an incoming traceparent) through the real services."""
    async with contextlib.AsyncExitStack() as stack:
        await start_scheduler(stack, nats_url)
        gateway = await start_gateway(stack, nats_url, model_dir)
        worker = await start_worker(stack, nats_url, "w0", model=gateway.model_name,
                                    adapters=[AdapterInfo(name="sql", rank=8, level="device")])
        await wait_until(lambda: "w0" in gateway.fleet.live_workers())
        bus = await client(stack, nats_url)
        inbox = bus.nc.new_inbox()
        sub = await bus.nc.subscribe(inbox)
        await bus.nc.publish(subjects.GENERATE, GenerateRequest(model="sql", prompt="hi", max_tokens=2,
                                                                request_id="traced").encode(), reply=inbox)
        while not Chunk.decode((await sub.next_msg(timeout=5)).data).final:
            pass
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{gateway.http_port}/v1/completions",
                                 json={"model": gateway.model_name, "prompt": "hi", "max_tokens": 2},
                                 headers={"traceparent": traceparent}) as response:
                assert response.status == 200
        assert len(worker.submits) == 2
    # leaving the stack shut the services down, which flushed their exporters


async def test_spans_of_one_request_share_a_trace_with_correct_parents(nats_server, tiny_model_dir, collector):
    client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    await run_requests(nats_server.url, tiny_model_dir, f"00-{client_trace}-{client_span}-01")
    deadline = time.monotonic() + 10
    while len(by_name(collector.spans(), "scheduler.route")) < 2 or "caraserve.ttft" not in collector.text():
        assert time.monotonic() < deadline, collector.text()[-3000:]
        time.sleep(0.05)
    spans = collector.spans()
    gateway_spans = {s.attributes.get("request.id"): s for s in by_name(spans, "gateway.request")}
    routes = {s.trace_id: s for s in by_name(spans, "scheduler.route")}

    nats_root = gateway_spans["traced"]
    assert nats_root.service == "caraserve-gateway" and nats_root.parent_id == ""
    assert nats_root.attributes["adapter"] == "sql" and nats_root.attributes["rank"] == "8"
    nats_route = routes[nats_root.trace_id]
    assert nats_route.service == "caraserve-scheduler" and nats_route.parent_id == nats_root.span_id
    assert nats_route.attributes["worker.id"] == "w0"

    http_root = next(s for s in gateway_spans.values() if s.trace_id == client_trace)
    assert http_root.parent_id == client_span  # continues the HTTP client's trace
    assert routes[client_trace].parent_id == http_root.span_id


def test_no_endpoint_means_no_op_telemetry():
    assert ExportSettings.from_env({}).traces_endpoint is None
    telemetry = setup_telemetry("quiet", {})
    assert not telemetry.exporting
    with telemetry.tracer.start_as_current_span("x") as span:
        assert not span.is_recording()
    off = ExportSettings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318/", "OTEL_TRACES_EXPORTER": "none"})
    assert off.traces_endpoint is None and off.metrics_endpoint == "http://h:4318/v1/metrics"
    explicit = ExportSettings.from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x", "OTEL_SERVICE_NAME": "s"})
    assert explicit.traces_endpoint == "http://t:1/x" and explicit.metrics_endpoint is None
    assert explicit.service_name == "s"
    assert ExportSettings.from_env({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h"}) \
        == ExportSettings()


ROTEL_SAMPLE = """\
ResourceSpans #0
Resource attributes:
     -> service.name: Str(caraserve-gateway)
ScopeSpans #0
Span #0
    Trace ID       : 4c872260ac66a4a23eb91f413d63ae92
    Parent ID      : 
    ID             : 49c5034d8fc918a9
    Name           : gateway.request
Start time: 1795501263045555931
Attributes:
     -> request.id: Str(r-1)
     -> worker.id: Str(worker-1)
Events:
SpanEvent #0
     -> Name: worker_lost
     -> Attributes::
          -> worker.id: Str(worker-0)
ResourceMetrics #0
Resource attributes:
     -> service.name: Str(caraserve-worker-1)
ScopeMetrics #0
Metric #0
NumberDataPoints #0
Data point attributes:
     -> adapter: Str(sql)
"""


def test_span_parser_keeps_event_and_metric_attributes_out_of_spans():
    [span] = parse_spans(ROTEL_SAMPLE)
    assert span.service == "caraserve-gateway" and span.name == "gateway.request" and span.parent_id == ""
    assert span.attributes == {"request.id": "r-1", "worker.id": "worker-1"}
