"""One request through the real stack is one trace across all three services, in a real collector.

The services export over OTLP to ``rotel-agent`` (see conftest). An HTTP request that carries
a W3C ``traceparent`` must produce, in the client's trace: ``gateway.request`` (child of the
client's span) -> ``scheduler.route`` -> ``worker.queue``, ``worker.prefill`` and
``worker.decode``, each tagged with the adapter, its rank, token counts and the worker id.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.e2e.clients import model_names, openai_client
from tests.service.rotel import RotelCollector, SpanRecord

pytestmark = pytest.mark.timeout(120)

CLIENT_TRACE, CLIENT_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
WORKER_SPANS = ("worker.queue", "worker.prefill", "worker.decode")
MAX_TOKENS = 5
METRICS = ("ttft", "tpot", "e2e_latency", "queue_depth", "requests")


async def trace_spans(collector: RotelCollector, trace_id: str, names: set[str]) -> list[SpanRecord]:
    """The trace's spans once every one of ``names`` has arrived (services export independently)."""
    deadline = time.monotonic() + 15
    while True:
        spans = [s for s in collector.spans() if s.trace_id == trace_id]
        if names <= {s.name for s in spans}:
            return spans
        assert time.monotonic() < deadline, [(s.service, s.name) for s in spans]
        await asyncio.sleep(0.1)


async def test_one_request_is_one_trace_across_gateway_scheduler_and_worker(e2e_stack, e2e_collector,
                                                                            tiny_adapters):
    _, adapters = model_names(e2e_stack.http_url)
    adapter = "regex_r64" if "regex_r64" in adapters else adapters[0]
    client = openai_client(e2e_stack.http_url)
    response = await asyncio.to_thread(
        client.completions.create, model=adapter, prompt="Questions and answers", max_tokens=MAX_TOKENS,
        temperature=0, extra_body={"ignore_eos": True},
        extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
    prompt_tokens = response.usage.prompt_tokens

    expected = {"gateway.request", "scheduler.route", *WORKER_SPANS}
    spans = {s.name: s for s in await trace_spans(e2e_collector, CLIENT_TRACE, expected)}
    # a cold adapter's request has its CPU-assisted prefill span too (cpu_assist, the default)
    assert set(spans) - {"worker.cpu_assist"} == expected
    gateway, route = spans["gateway.request"], spans["scheduler.route"]
    assert gateway.service == "caraserve-gateway" and gateway.parent_id == CLIENT_SPAN
    assert gateway.attributes["request.id"] == response.id
    assert route.service in ("caraserve-scheduler-0", "caraserve-scheduler-1")
    assert route.parent_id == gateway.span_id
    worker_id = route.attributes["worker.id"]
    assert gateway.attributes["worker.id"] == worker_id
    for name in WORKER_SPANS:
        span = spans[name]
        assert span.service == f"caraserve-{worker_id}" and span.parent_id == route.span_id, span
        assert span.attributes["worker.id"] == worker_id and span.attributes["request.id"] == response.id
        assert span.attributes["prompt_tokens"] == str(prompt_tokens)
        assert span.attributes["completion_tokens"] == str(MAX_TOKENS)
    rank = "64" if adapter == "regex_r64" else gateway.attributes["rank"]
    for span in spans.values():
        assert span.attributes["adapter"] == adapter and span.attributes["rank"] == rank, span
    assert gateway.attributes["tokens"] == route.attributes["tokens"] == str(prompt_tokens)
    assert gateway.attributes["completion_tokens"] == str(MAX_TOKENS)
    assert len({s.span_id for s in spans.values()}) == len(spans)  # distinct spans

    deadline = time.monotonic() + 10
    while not all(f"caraserve.{m}" in e2e_collector.text() for m in METRICS):
        assert time.monotonic() < deadline, "the serving metrics never reached the collector"
        await asyncio.sleep(0.1)
