"""The control-plane benchmark's parts: the OTLP sink decodes real exports; the breakdown adds up."""

from __future__ import annotations

import numpy as np
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from bench.control_plane.clients import LoadRun, Timed
from bench.control_plane.report import STAGES, index_spans, latency_samples, throughput_summary
from bench.control_plane.otlp_sink import OtlpSink, SpanTimes


def test_sink_receives_what_the_otlp_exporter_sends():
    with OtlpSink() as sink:
        for compression in (Compression.NoCompression, Compression.Gzip):
            provider = TracerProvider(resource=Resource.create({"service.name": "svc"}))
            provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(sink.endpoint, compression=compression)))
            tracer = provider.get_tracer("t")
            with tracer.start_as_current_span("outer", attributes={"request.id": "r1", "rank": 8}) as outer:
                with tracer.start_as_current_span("inner"):
                    pass
            provider.shutdown()
        spans = sink.spans()
    assert sink.bad_requests == 0 and len(spans) == 4
    inner, outer_span = spans[2], spans[3]  # the gzip-compressed export (the last one)
    assert (outer_span.service, outer_span.name) == ("svc", "outer")
    assert outer_span.attributes == {"request.id": "r1", "rank": 8}
    assert inner.parent_id == outer_span.span_id == format(outer.get_span_context().span_id, "016x")
    assert outer_span.start_ns <= inner.start_ns <= inner.end_ns <= outer_span.end_ns


def span(name: str, start: int, end: int, request_id: str = "a") -> SpanTimes:
    return SpanTimes("s", name, "t", name, "", start, end, {"request.id": request_id, "worker.id": "w"})


def test_stages_add_up_to_the_client_ttft_and_engine_ttft_comes_from_worker_spans():
    spans = [span("gateway.request", 110, 900), span("scheduler.route", 150, 400), span("worker.queue", 300, 320),
             span("worker.prefill", 320, 700), span("worker.decode", 700, 700), span("worker.prefill", 1, 2, "other")]
    timed = [Timed("a", sent_ns=100, first_ns=950, final_ns=960, finish_reason="length"),
             Timed("other", sent_ns=0, first_ns=5, final_ns=6, finish_reason="length")]
    samples = latency_samples(timed, index_spans(spans))
    assert samples.unmatched == 1  # "other" lacks its gateway/scheduler/queue spans
    assert samples.client.tolist() == [850] and samples.engine.tolist() == [400] and samples.added.tolist() == [450]
    assert [int(samples.stages[s][0]) for s in STAGES] == [10, 40, 150, 400, 250]
    assert sum(int(samples.stages[s][0]) for s in STAGES) == 850


def test_throughput_counts_errors_and_timeouts():
    ok = [Timed(f"r{i}", sent_ns=i * 10**7, first_ns=i * 10**7 + 10**6, final_ns=i * 10**7 + 10**6,
                finish_reason="length") for i in range(100)]
    bad = [Timed("x", sent_ns=0, finish_reason="error", error="overloaded"),
           Timed("y", sent_ns=0, finish_reason="error", error="timeout")]
    summary = throughput_summary(LoadRun(100.0, 1.0, 0, 10**9, ok + bad))
    assert summary["completed"] == 100 and summary["errors"] == {"overloaded": 1, "timeout": 1}
    assert np.isclose(summary["achieved_rps"], 100 / 0.991, atol=0.1)
    assert summary["ttft_ms"]["p50"] == 1.0
