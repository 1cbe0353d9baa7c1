"""A loopback OTLP/HTTP trace receiver for benchmarks: keeps every span it is sent, with exact timestamps.

The services export traces with the standard OTLP/HTTP protobuf exporter (``OTEL_EXPORTER_OTLP_
TRACES_ENDPOINT=<sink.endpoint>``); the sink decodes each ``ExportTraceServiceRequest`` with the
OpenTelemetry protobuf types and answers like a collector. It runs on its own thread (stdlib
HTTP server), so it never shares an event loop with the benchmark's clients.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (ExportTraceServiceRequest,
                                                                      ExportTraceServiceResponse)

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class SpanTimes:
    """One received span: who sent it, its ids and its start/end (ns since the epoch)."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def decode_spans(body: bytes) -> list[SpanTimes]:
    """Every span in one OTLP ``ExportTraceServiceRequest`` (protobuf bytes)."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(SpanTimes(service, span.name, span.trace_id.hex(), span.span_id.hex(),
                                       span.parent_span_id.hex(), span.start_time_unix_nano, span.end_time_unix_nano,
                                       {kv.key: _value(kv.value) for kv in span.attributes}))
    return spans


class OtlpSink:
    """``with OtlpSink() as sink:`` point exporters at ``sink.endpoint``; read ``sink.spans()``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._spans: list[SpanTimes] = []
        self._lock = threading.Lock()
        self.bad_requests = 0
        self._server = ThreadingHTTPServer((host, 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-sink", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}{TRACES_PATH}"

    def __enter__(self) -> OtlpSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def spans(self) -> list[SpanTimes]:
        with self._lock:
            return list(self._spans)

    def _receive(self, body: bytes, encoding: str) -> bool:
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            spans = decode_spans(body)
        except (OSError, zlib.error, ValueError):
            self.bad_requests += 1
            return False
        with self._lock:
            self._spans.extend(spans)
        return True

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                ok = self.path == TRACES_PATH and sink._receive(body, self.headers.get("Content-Encoding", ""))
                reply = ExportTraceServiceResponse().SerializeToString() if ok else b""
                self.send_response(200 if ok else 400)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
                return None

        return Handler
