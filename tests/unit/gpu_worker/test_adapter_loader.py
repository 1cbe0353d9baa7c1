"""The loader thread: FIFO loads, layer groups landing one by one, errors, never blocking the caller."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from services.gpu_worker.residency.link import EmulatedLink
from services.gpu_worker.residency.loader import AdapterLoader, Landed, layer_groups
from services.gpu_worker.residency.host_store import HostStore
from shared.adapter_registry import AdapterRegistry
from tests.unit.gpu_worker.residency_fixtures import residency_root, tiny_shape  # noqa: F401


def _collect(loader: AdapterLoader, count: int, timeout: float = 10.0) -> list[Landed]:
    out: list[Landed] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        loader.wait(0.05)
        out += loader.landed()
    return out


@pytest.fixture
def setup(residency_root, tiny_shape):
    made = []

    def build(gbps: float = 0.0, latency_ms: float = 0.0, groups: int = 1, root=None):
        registry = AdapterRegistry(root or residency_root, dtype_bytes=4)
        store = HostStore(10 ** 8, tiny_shape, 64, torch.float32, pin=False)
        loader = AdapterLoader(store, EmulatedLink(gbps, latency_ms), tiny_shape.num_layers, groups)
        made.append(loader)
        return registry, store, loader

    yield build
    for loader in made:
        loader.close()


def test_layer_groups():
    assert layer_groups(3, 1) == [range(0, 3)]
    assert layer_groups(30, 4) == [range(0, 8), range(8, 15), range(15, 22), range(22, 30)]
    assert layer_groups(2, 5) == [range(0, 1), range(1, 2)]


def test_groups_land_in_order_with_their_layers(setup):
    registry, _, loader = setup(groups=3)
    loader.submit(registry.resolve("a0"))
    landed = _collect(loader, 3)
    assert [list(l.layers) for l in landed] == [[0], [1], [2]]
    assert [l.last for l in landed] == [False, False, True]
    for l in landed:
        assert {k[0] for k in l.weights} == set(l.layers) and {k[1] for k in l.weights} == {"q_proj", "v_proj"}


def test_loads_run_fifo(setup):
    registry, _, loader = setup()
    jobs = [loader.submit(registry.resolve(n)) for n in ("a2", "a0", "a1")]
    assert [l.job for l in _collect(loader, 3)] == jobs


def test_landed_never_blocks_while_a_load_is_in_flight(setup):
    registry, _, loader = setup(latency_ms=300.0)
    loader.submit(registry.resolve("a0"))
    start = time.monotonic()
    assert loader.landed() == []
    assert time.monotonic() - start < 0.05
    assert len(_collect(loader, 1)) == 1


def test_load_time_is_latency_plus_bytes_over_g(setup):
    registry, store, loader = setup(gbps=0.001, latency_ms=50.0, groups=2)  # 1 MB/s
    record = registry.resolve("big")
    store.get(record)  # in host memory already: only the link is timed
    loader.submit(record)
    first, last = _collect(loader, 2)
    expected = 0.050 + record.nbytes / 1e6
    assert expected <= last.load_s < expected + 0.15
    assert 0.050 + record.nbytes / 2e6 <= first.load_s < last.load_s


def test_corrupt_adapter_fails_alone(tmp_path, setup, residency_root, bad_adapters):
    shutil.copytree(residency_root / "a0", tmp_path / "a0")
    shutil.copytree(bad_adapters["inf"], tmp_path / "inf")
    registry, _, loader = setup(root=tmp_path)
    loader.submit(registry.resolve("inf"))
    loader.submit(registry.resolve("a0"))
    bad, good = _collect(loader, 2)
    assert bad.error is not None and "Inf" in bad.error and bad.last and not bad.weights
    assert good.error is None and good.job.name == "a0" and good.weights


def test_cancelled_job_is_not_loaded(setup):
    registry, _, loader = setup(latency_ms=100.0)
    loader.submit(registry.resolve("a0"))
    job = loader.submit(registry.resolve("a1"))
    job.cancelled = True
    landed = _collect(loader, 2)
    assert landed[1].job is job and "unloaded" in landed[1].error
