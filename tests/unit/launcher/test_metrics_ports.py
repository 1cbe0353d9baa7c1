"""`caraserve up --metrics-port P`: the gateway's /metrics on P, worker i's on P+1+i, listed at start-up."""

from __future__ import annotations

import pytest

from launcher.local_stack import LocalStack, StackConfig
from launcher.metrics_ports import metrics_listing
from launcher.stack_credentials import StackCredentials
from shared.config import ConfigError
from shared.nats_server import NatsServer


def stack_for(monkeypatch, tmp_path, metrics_port: int, workers: int = 2) -> LocalStack:
    monkeypatch.delenv("CARASERVE_METRICS_PORT", raising=False)
    stack = LocalStack(StackConfig(workers=workers, http_port=0, nats_port=0, run_dir=str(tmp_path),
                                   metrics_port=metrics_port))
    stack.nats = NatsServer()  # never started: only its (empty) url is read
    stack.creds = StackCredentials.generate(tmp_path / "nats", schedulers=1, workers=workers)
    return stack


def test_each_service_gets_its_port_and_the_printout_lists_them(monkeypatch, tmp_path):
    stack = stack_for(monkeypatch, tmp_path, 9100)
    assert stack._gateway_env()["CARASERVE_METRICS_PORT"] == "9100"
    assert [stack._worker_env(i)["CARASERVE_METRICS_PORT"] for i in range(2)] == ["9101", "9102"]
    assert "CARASERVE_METRICS_PORT" not in stack._scheduler_env(0)
    listing = metrics_listing(stack.metrics_ports)
    assert [line.split()[-1] for line in listing.splitlines()] == [
        "http://127.0.0.1:9100/metrics", "http://127.0.0.1:9101/metrics", "http://127.0.0.1:9102/metrics"]


def test_metrics_are_off_by_default(monkeypatch, tmp_path):
    assert StackConfig().metrics_port == 0
    stack = stack_for(monkeypatch, tmp_path, 0)
    assert "CARASERVE_METRICS_PORT" not in stack._gateway_env() and "CARASERVE_METRICS_PORT" not in stack._worker_env(0)
    assert metrics_listing(stack.metrics_ports) == ""


def test_a_port_range_past_65535_is_refused():
    with pytest.raises(ConfigError):
        StackConfig(workers=2, metrics_port=65534)
