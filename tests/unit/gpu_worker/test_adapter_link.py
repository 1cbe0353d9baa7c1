"""The EMULATED link costs latency + bytes / G per load; its "device" tensors are the host's own."""

from __future__ import annotations

import time

import pytest
import torch

from services.gpu_worker.residency.link import EmulatedLink, make_link


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _weights(numel: int) -> dict:
    return {(0, "q_proj"): (torch.zeros(numel // 2, dtype=torch.float32), torch.zeros(numel // 2))}


def test_cost_model():
    link = EmulatedLink(gbps=2.0, latency_ms=5.0)
    assert link.emulated
    assert link.cost_s(4_000_000) == pytest.approx(0.005 + 0.002)
    assert EmulatedLink(0.0, 3.0).cost_s(10 ** 9) == pytest.approx(0.003)
    assert not EmulatedLink(0.0, 0.0).emulated


def test_groups_land_at_latency_plus_cumulative_bytes_over_g():
    clock = FakeClock()
    link = EmulatedLink(gbps=1.0, latency_ms=10.0, clock=clock, sleep=clock.sleep)
    link.begin()
    first, h1 = link.send(_weights(250_000))  # 1 MB of float32
    _, h2 = link.send(_weights(250_000))
    link.wait(h1)
    assert clock.now == pytest.approx(100.0 + 0.010 + 0.001)
    link.wait(h2)
    assert clock.now == pytest.approx(100.0 + 0.010 + 0.002)


def test_send_shares_the_host_tensors():
    # on a CPU-only host "device" memory is host memory: a second copy would only double the RSS
    link = EmulatedLink(0.0, 0.0)
    src = _weights(8)
    out, _ = link.send(src)
    assert out == src and out is not src
    assert out[(0, "q_proj")][0].data_ptr() == src[(0, "q_proj")][0].data_ptr()


def test_real_sleep_matches_the_model():
    link = EmulatedLink(gbps=0.01, latency_ms=40.0)  # 10 MB/s
    start = time.monotonic()
    link.begin()
    _, handle = link.send(_weights(250_000))  # 1 MB -> 100 ms
    link.wait(handle)
    elapsed = time.monotonic() - start
    assert 0.140 <= elapsed < 0.140 + 0.15  # sleeping may overshoot on a busy machine, never undershoot


def test_cpu_device_gets_the_emulated_link():
    assert isinstance(make_link("cpu", 1.0, 1.0), EmulatedLink)
