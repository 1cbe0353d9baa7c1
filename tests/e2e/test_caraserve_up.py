"""``caraserve up`` itself, as a user runs it: it serves, heals, then SIGTERM stops everything cleanly.

The launcher runs as a subprocess on the tiny model. Once it prints "serving", the gateway
URL it printed must answer, and its process tree must hold nats-server and every service.
A SIGKILLed gpu_worker is restarted (one log line) and is live again, the launcher serving on.
After SIGTERM it must exit 0 with none of those processes left and no ``caraserve``
shared-memory segment left behind.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.e2e.clients import OTEL_VARS

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
SERVING_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30
URL_LINE = re.compile(r"HTTP \(OpenAI-compatible\):\s+(http://\S+)/v1")


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith("caraserve")}


def read_lines(proc: subprocess.Popen) -> queue.Queue:
    """The launcher's output lines, read on a thread (so the pipe never fills up)."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for_serving(lines: queue.Queue) -> tuple[str, list[str]]:
    """Read until the "serving" line; the HTTP URL printed before it, and everything read."""
    seen: list[str] = []
    deadline = time.monotonic() + SERVING_TIMEOUT_S
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, "caraserve up exited early:\n" + "".join(seen[-40:])
        seen.append(line)
        if line.startswith("serving"):
            urls = [m.group(1) for m in map(URL_LINE.search, seen) if m]
            assert urls, "".join(seen)
            return urls[0], seen


def wait_for_line(lines: queue.Queue, text: str) -> None:
    deadline = time.monotonic() + SERVING_TIMEOUT_S
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, f"caraserve up exited while waiting for {text!r}"
        if text in line:
            return


def wait_for_health(url: str, predicate) -> None:
    deadline = time.monotonic() + SERVING_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if predicate(json.loads(response.read())):
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "the stack did not heal"
        time.sleep(0.2)


def test_caraserve_up_serves_then_sigterm_stops_everything(tiny_model_dir, adapter_root, tmp_path):
    before = shm_segments()
    env = {k: v for k, v in os.environ.items() if k not in OTEL_VARS}
    env.update(CARASERVE_DTYPE="float32", CARASERVE_NUM_KV_BLOCKS="64", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "launcher.cli", "up", "--http-port", "0", "--nats-port", "0", "--workers", "1",
           "--model", str(tiny_model_dir), "--adapter-dir", str(adapter_root), "--run-dir", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = read_lines(proc)
        url, output = wait_for_serving(lines)
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            assert response.status == 200
        assert any(line.startswith("[") and "->" in next_line
                   for line, next_line in zip(output, output[1:])), "no demo answer printed"
        children = psutil.Process(proc.pid).children(recursive=True)
        commands = [" ".join(c.cmdline()) for c in children]
        assert any("nats-server" in c for c in commands), commands
        for service in ("gateway", "scheduler", "gpu_worker"):
            assert any(c.endswith(f"service {service}") for c in commands), (service, commands)

        worker = next(c for c, command in zip(children, commands) if command.endswith("service gpu_worker"))
        worker.kill()
        wait_for_line(lines, "gpu_worker-0 exited with status -9; restart 1 in")
        wait_for_health(url, lambda h: h.get("status") == "ok" and h.get("workers") == ["worker-0"])
        assert proc.poll() is None  # serving on
        children = psutil.Process(proc.pid).children(recursive=True)  # the restarted worker included

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(STOP_TIMEOUT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(children, timeout=2)
    assert not alive, [" ".join(p.cmdline()) for p in alive]
    assert shm_segments() <= before, shm_segments() - before
