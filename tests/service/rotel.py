"""A real OTLP collector for tests: ``rotel-agent`` (PyPI ``rotel``) on loopback ports.

It receives OTLP over HTTP and gRPC, exports nowhere (``blackhole``) and prints what it got
(``--debug-log traces --debug-log metrics``, detailed) to a log we parse here.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import rotel

AGENT = Path(rotel.__file__).parent / "rotel-agent"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class SpanRecord:
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    attributes: dict[str, str]


class RotelCollector:
    """``with RotelCollector(tmp_path) as c:`` exports go to ``c.endpoint``; ``c.spans()`` parses the log."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.http_port}"
        self.output = workdir / "rotel.out"
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> RotelCollector:
        cmd = [str(AGENT), "start", "--exporter", "blackhole", "--debug-log", "traces", "--debug-log", "metrics",
               "--debug-log-verbosity", "detailed", "--batch-timeout", "50ms",
               "--otlp-http-endpoint", f"127.0.0.1:{self.http_port}",
               "--otlp-grpc-endpoint", f"127.0.0.1:{self.grpc_port}",
               "--pid-file", str(self.workdir / "rotel.pid"), "--log-file", str(self.workdir / "rotel.log")]
        with open(self.output, "wb") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not self._accepts():
            assert self._proc.poll() is None, self.output.read_text()
            assert time.monotonic() < deadline, "rotel-agent did not start"
            time.sleep(0.02)
        return self

    def _accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.http_port), timeout=0.2):
                return True
        except OSError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def text(self) -> str:
        return re.sub(r"\x1b\[[0-9;]*m", "", self.output.read_text(errors="replace"))

    def spans(self) -> list[SpanRecord]:
        return parse_spans(self.text())


_NOT_SPAN_ATTRIBUTES = ("Events:", "Links:", "ResourceMetrics #", "ResourceLogs #")
_FIELD = re.compile(r"^\s*(Trace ID|Parent ID|ID|Name)\s*:\s*(.*)$")
_ATTR = re.compile(r"^\s*-> ([\w.]+): \w+\((.*)\)$")


def parse_spans(text: str) -> list[SpanRecord]:
    """Spans from rotel's detailed debug log, each with its resource's ``service.name``."""
    spans: list[SpanRecord] = []
    service = ""
    current: dict | None = None
    in_resource = False
    for line in text.splitlines():
        if line.startswith("ResourceSpans #"):
            service, in_resource, current = "", True, None
        elif line.startswith("ScopeSpans #"):
            in_resource = False
        elif line.startswith("Span #"):
            current = {"attributes": {}}
            spans.append(current)  # type: ignore[arg-type]
        elif line.startswith(_NOT_SPAN_ATTRIBUTES):
            current = None  # what follows (span events, links, metrics) is not the span's own
        elif (attr := _ATTR.match(line)) is not None:
            if in_resource and attr.group(1) == "service.name":
                service = attr.group(2)
            elif current is not None:
                current["attributes"][attr.group(1)] = attr.group(2)
        elif current is not None and (field := _FIELD.match(line)) is not None:
            current[field.group(1)] = field.group(2).strip()
            current["service"] = service
    return [SpanRecord(s["service"], s["Trace ID"], s["ID"], s.get("Parent ID", ""), s["Name"], s["attributes"])
            for s in spans if "ID" in s]
