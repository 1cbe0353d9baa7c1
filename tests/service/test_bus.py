"""The bus helpers and the nats-server subprocess, against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import sys
import time

import pytest
from nats.errors import NoRespondersError
from opentelemetry.sdk.trace import TracerProvider

from shared import subjects
from shared.bus import Bus, connect, serve_until_stopped, service_main
from shared.nats_server import NatsServer, NatsServerConfig, NatsServerError, render_config
from shared.schemas import (AdapterList, AdapterListRequest, AdapterUnload, ErrorReply, RemoteError, ServiceError,
                            WorkerState)
from shared.telemetry import extract_context
from tests.service.rotel import free_port

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("concurrent", [True, False])
async def test_bad_payloads_and_failing_handlers_get_typed_error_replies(nats_server, stack, concurrent):
    server = await Bus.open(nats_server.url, "server", stack, grace_s=0.5)
    calls, tasks = [], set()

    async def handler(request: AdapterUnload, msg):
        calls.append(request.name)
        tasks.add(asyncio.current_task())
        if request.name == "refused":
            raise ServiceError("model_not_found", "no such adapter")
        if request.name == "crash":
            raise RuntimeError("handler bug")
        return AdapterList(worker_id="w0")

    await server.serve("test.unload", AdapterUnload, handler, concurrent=concurrent)
    peer = await Bus.open(nats_server.url, "peer", stack, grace_s=0.1)
    for payload, code in ((b"\xff\x00", "bad_payload"), (AdapterListRequest().encode(), "bad_payload"),
                          (b'\x82\xa1v\x07\xa4name\xa1x', "unsupported_version")):
        reply = await peer.nc.request("test.unload", payload, timeout=2)
        assert ErrorReply.decode(reply.data).error.code == code
    with pytest.raises(RemoteError) as raised:
        await peer.request("test.unload", AdapterUnload(name="refused"), AdapterList, timeout=2)
    assert raised.value.info.code == "model_not_found" and raised.value.info.type == "not_found_error"
    with pytest.raises(RemoteError) as raised:
        await peer.request("test.unload", AdapterUnload(name="crash"), AdapterList, timeout=2)
    assert raised.value.info.code == "internal_error"
    reply = await peer.request("test.unload", AdapterUnload(name="fine"), AdapterList, timeout=2)
    assert reply.worker_id == "w0" and calls == ["refused", "crash", "fine"]  # still serving
    assert len(tasks) == (3 if concurrent else 1)  # a task per message, or all in the subscription's


async def test_listen_drops_bad_messages_and_keeps_going(nats_server, stack):
    bus = await Bus.open(nats_server.url, "listener", stack, grace_s=0.1)
    received = []
    await bus.listen("test.state", WorkerState, lambda state, msg: received.append(state.worker_id))
    for payload in (b"junk", AdapterListRequest().encode(),
                    WorkerState(worker_id="w1", model="m", backend="b").encode()):
        await bus.nc.publish("test.state", payload)
    await bus.nc.flush()
    deadline = time.monotonic() + 2
    while not received and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert received == ["w1"]


async def test_trace_context_travels_in_nats_headers(nats_server, stack):
    sender = await Bus.open(nats_server.url, "sender", stack, grace_s=0.1)
    sub = await sender.nc.subscribe("test.traced")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("outer") as span:
        await sender.publish("test.traced", AdapterListRequest())
    msg = await sub.next_msg(timeout=2)
    assert msg.headers["traceparent"].split("-")[1] == format(span.get_span_context().trace_id, "032x")
    from opentelemetry import trace

    parent = trace.get_current_span(extract_context(msg.headers)).get_span_context()
    assert parent.span_id == span.get_span_context().span_id
    await sender.publish("test.traced", AdapterListRequest())  # no active span: no headers
    assert (await sub.next_msg(timeout=2)).headers is None


async def test_close_lets_running_handlers_finish_then_drains(nats_server):
    finished = []

    async def slow(request, msg):
        await asyncio.sleep(0.2)
        finished.append(True)
        return AdapterList(worker_id="w0")

    async with contextlib.AsyncExitStack() as stack:
        server = await Bus.open(nats_server.url, "server", stack, grace_s=2)
        await server.serve("test.slow", AdapterListRequest, slow)
        peer = await Bus.open(nats_server.url, "peer")
        pending = asyncio.ensure_future(peer.request("test.slow", AdapterListRequest(), AdapterList, timeout=3))
        await asyncio.sleep(0.05)
    assert finished == [True] and server.nc.is_closed
    assert (await pending).worker_id == "w0"  # answered before the connection closed
    await peer.close(0)


async def test_connect_retries_until_the_server_comes_up():
    port = free_port()
    connecting = asyncio.ensure_future(connect(f"nats://127.0.0.1:{port}", "early", connect_deadline_s=10))
    await asyncio.sleep(0.3)
    assert not connecting.done()
    with NatsServer(NatsServerConfig(port=port)):
        nc = await connecting
        assert nc.is_connected
        await nc.close()
    with pytest.raises(ConnectionError):
        await connect(f"nats://127.0.0.1:{port}", "late", connect_deadline_s=0.3)


async def test_a_connection_survives_a_nats_server_restart():
    port = free_port()
    with NatsServer(NatsServerConfig(port=port)):
        bus = await Bus.open(f"nats://127.0.0.1:{port}", "survivor")
        await bus.serve("test.echo", AdapterListRequest, _echo)
    with NatsServer(NatsServerConfig(port=port)):
        deadline = time.monotonic() + 10
        while not (bus.connected and bus.nc.stats["reconnects"] >= 1):
            assert time.monotonic() < deadline, "did not reconnect"
            await asyncio.sleep(0.05)
        await bus.nc.flush()
        peer = await Bus.open(f"nats://127.0.0.1:{port}", "peer")
        reply = await peer.request("test.echo", AdapterListRequest(), AdapterList, timeout=3)
        assert reply.worker_id == "echo"  # the subscription was restored too
        await peer.close(0)
        await bus.close(0)


async def _echo(request, msg):
    return AdapterList(worker_id="echo")


async def test_serve_until_stopped_unwinds_in_reverse_order():
    order, frozen = [], []
    stop = asyncio.Event()

    def check_and_stop() -> None:
        frozen.append(gc.get_freeze_count())
        stop.set()

    async def start(stack: contextlib.AsyncExitStack) -> None:
        stack.callback(order.append, "first registered")
        stack.callback(order.append, "last registered")
        asyncio.get_running_loop().call_later(0.05, check_and_stop)

    await serve_until_stopped(start, stop)
    assert order == ["last registered", "first registered"]
    assert frozen[0] > 1000 and gc.get_freeze_count() == 0  # the startup heap was frozen while serving


async def test_service_process_stops_cleanly_on_sigterm(nats_server, stack):
    env = {**os.environ, "CARASERVE_NATS_URL": nats_server.url, "OTEL_SDK_DISABLED": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "services.scheduler"], env=env, stderr=subprocess.PIPE)
    try:
        probe = await Bus.open(nats_server.url, "probe", stack, grace_s=0.1)
        deadline = time.monotonic() + 20
        while True:  # serving once a junk route request gets its typed error reply
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the scheduler process did not start serving"
            try:
                reply = await probe.nc.request(subjects.ROUTE, b"junk", timeout=0.5)
                break
            except (NoRespondersError, asyncio.TimeoutError):
                await asyncio.sleep(0.05)
        assert ErrorReply.decode(reply.data).error.code == "bad_payload"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_a_service_started_with_a_refused_setting_says_so_in_one_line():
    env = {**os.environ, "CARASERVE_POLICY": "nonsense", "OTEL_SDK_DISABLED": "true"}
    done = subprocess.run([sys.executable, "-m", "services.scheduler"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "nonsense" in done.stderr


def test_service_main_turns_an_unreachable_nats_into_one_error_line():
    async def start(stack: contextlib.AsyncExitStack) -> None:
        raise ConnectionError("scheduler: cannot reach NATS at nats://127.0.0.1:1: refused")

    with pytest.raises(SystemExit) as ended:
        service_main(lambda: start)
    assert ended.value.code == "error: scheduler: cannot reach NATS at nats://127.0.0.1:1: refused"

    def unbuildable():
        raise RuntimeError("a bug, not a setting")

    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        service_main(unbuildable)


def test_nats_server_config_and_limits(nats_server):
    assert nats_server.url.startswith("nats://127.0.0.1:") and nats_server.running
    text = render_config(NatsServerConfig(port=4333, max_payload_mb=16, monitor_port=0))
    assert 'listen: "127.0.0.1:4333"' in text and "max_payload: 16MB" in text and 'http: "127.0.0.1:-1"' in text

    async def payload_limit() -> int:
        nc = await connect(nats_server.url, "probe")
        limit = nc.max_payload
        await nc.close()
        return limit

    assert asyncio.run(payload_limit()) == 8 * 1024 * 1024


def test_nats_server_reports_a_taken_port_and_cleans_up(nats_server):
    with pytest.raises(NatsServerError):
        NatsServer(NatsServerConfig(port=nats_server.port, startup_timeout_s=3)).start()
    server = NatsServer(NatsServerConfig(monitor_port=0))
    server.start()
    proc = server._proc
    assert server.monitor_url.startswith("http://127.0.0.1:")
    server.stop()
    assert proc.poll() is not None and not server.running
