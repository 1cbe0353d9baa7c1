"""TieredResidency on its own: byte budget by rank, LRU, pinning, FIFO waits, failures, unload, visibility."""

from __future__ import annotations

import shutil
import time

import pytest

from services.gpu_worker.residency.protocol import UnknownAdapterError
from services.gpu_worker.residency.cold_start import Admit
from services.gpu_worker.residency.tiered import AdapterUnavailableError, TieredResidency
from tests.unit.gpu_worker.residency_fixtures import (SMALL, make_manager, residency_root,  # noqa: F401
                                                      small_bytes, tiny_shape)


def ready(m: TieredResidency, name: str) -> bool:
    return m.admit(name, 1) is Admit.DEVICE


def settle(m: TieredResidency, names: list[str], timeout: float = 10.0) -> None:
    """Resolve the names (as the engine does on arrival), then poll until every one is ready."""
    for n in names:
        m.rank(n)
    deadline = time.monotonic() + timeout
    while not all(ready(m, n) for n in names):
        assert time.monotonic() < deadline, f"not ready: {[n for n in names if not ready(m, n)]}"
        m.poll()
        m.wait_for_progress(0.02)


def poll_for(m: TieredResidency, seconds: float, asking: tuple[str, ...] = ()) -> None:
    """Poll for a while; waiting requests of ``asking`` ask for their adapter each step, as admission does."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        m.poll()
        for name in asking:
            ready(m, name)
        m.wait_for_progress(0.01)


@pytest.fixture
def one(tiny_shape) -> int:
    return small_bytes(tiny_shape)


def test_space_is_taken_by_rank(make_manager, one):
    m = make_manager(device_adapter_bytes=8 * one)
    settle(m, SMALL[:2])
    settle(m, ["big"])  # big needs the whole budget: the two small ones are evicted
    big = m.cache.get("big")
    assert big.nbytes == 8 * one == m.device_adapter("big").nbytes
    assert m.registry.lookup("a0").nbytes == one
    assert {a.shape[1] for a, _ in m.device_adapter("big").weights.values()} == {64}
    assert m.cache.used_bytes == 8 * one and m.counters.evictions == 2


def test_eight_rank_8_adapters_fit_where_one_rank_64_does(make_manager, one):
    m = make_manager(device_adapter_bytes=8 * one)
    for name in SMALL:
        m.rank(name)
        m.prefetch(name)
    settle(m, SMALL)
    assert m.cache.used_bytes == 6 * one and m.counters.evictions == 0


def test_lru_eviction(make_manager, one):
    m = make_manager(device_adapter_bytes=2 * one)
    for name in ("a0", "a1", "a0"):  # a request of each runs; a0 is now the most recently used
        settle(m, [name])
        m.acquire(name, name, Admit.DEVICE)
        m.release(name, name)
    settle(m, ["a2"])
    assert [e.name for e in m.cache.entries()] == ["a0", "a2"]
    assert m.level("a1") == "host" and m.level("a2") == "device"


def test_pinned_adapter_loads_at_once_and_stays(make_manager, one):
    m = make_manager(device_adapter_bytes=2 * one)
    m.register("pinned-a3", "a3", pinned=True)
    poll_for(m, 0.2)
    assert ready(m, "pinned-a3")  # loaded without any request
    for name in ("a0", "a1", "a2"):
        settle(m, [name])
    assert "pinned-a3" in m.cache and m.cache.get("pinned-a3").pinned


def test_full_of_in_use_adapters_loads_wait_in_fifo_order(make_manager, one):
    m = make_manager(device_adapter_bytes=2 * one)
    settle(m, ["a0", "a1"])
    m.acquire("a0", "a0", Admit.DEVICE)
    m.acquire("a1", "a1", Admit.DEVICE)
    m.rank("a2")
    m.rank("a3")
    assert not ready(m, "a2") and not ready(m, "a3")  # a2 asked first
    poll_for(m, 0.2, ("a2", "a3"))
    assert "a2" not in m.cache and "a3" not in m.cache and m.failure("a2") is None
    assert not ready(m, "a0")  # draining: no new request may start on a0 while a2 waits
    m.release("a0", "a0")
    poll_for(m, 0.2, ("a2", "a3"))
    assert ready(m, "a2") and "a3" not in m.cache
    m.acquire("a2", "a2", Admit.DEVICE)
    m.release("a1", "a1")
    settle(m, ["a3"])
    assert m.failure("a3") is None and m.counters.load_failures == 0


def test_oversize_adapter_is_an_error_for_it_alone(make_manager, one):
    m = make_manager(device_adapter_bytes=4 * one)
    m.rank("big")
    m.prefetch("big")
    m.poll()
    assert "more than the whole device adapter budget" in m.failure("big")
    settle(m, ["a0"])
    assert m.failure("a0") is None


def test_pinned_adapters_leave_no_room(make_manager, one):
    m = make_manager(device_adapter_bytes=2 * one)
    m.register("p0", "a0", pinned=True)
    m.register("p1", "a1", pinned=True)
    poll_for(m, 0.2)
    m.rank("a2")
    m.prefetch("a2")
    m.poll()
    assert "pinned adapters leave only 0" in m.failure("a2")


def test_corrupt_adapter_fails_and_disturbs_nothing(tmp_path, make_manager, residency_root, bad_adapters, one):
    for name in ("a0", "a1"):
        shutil.copytree(residency_root / name, tmp_path / name)
    shutil.copytree(bad_adapters["nan"], tmp_path / "nan")
    m = make_manager(root=tmp_path, device_adapter_bytes=4 * one)
    settle(m, ["a0"])
    m.rank("nan")
    m.prefetch("nan")
    m.rank("a1")
    m.prefetch("a1")
    settle(m, ["a1"])
    assert "NaN" in m.failure("nan") and m.counters.load_failures == 1
    assert "nan" not in m.cache and ready(m, "a0") and m.cache.used_bytes == 2 * one
    m.prefetch("nan")  # a new request retries
    assert m.failure("nan") is None


def test_unusable_directory_is_a_typed_unknown_adapter_error(tmp_path, make_manager, bad_adapters):
    shutil.copytree(bad_adapters["invalid_config"], tmp_path / "broken")
    m = make_manager(root=tmp_path)
    with pytest.raises(AdapterUnavailableError, match="corrupt adapter_config.json") as err:
        m.rank("broken")
    assert isinstance(err.value, UnknownAdapterError)
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'ghost'"):
        m.rank("ghost")


def test_unregister_in_use_frees_after_release(make_manager, one):
    m = make_manager(device_adapter_bytes=2 * one)
    settle(m, ["a0"])
    m.acquire("a0", "a0", Admit.DEVICE)
    m.unregister("a0")
    m.poll()
    assert m.failure("a0") == "unknown adapter 'a0'"
    with pytest.raises(UnknownAdapterError):
        m.rank("a0")  # the resolver does not bring it back
    assert m.device_adapter("a0") is not None  # the running request keeps its weights
    m.release("a0", "a0")
    assert "a0" not in m.cache and m.cache.used_bytes == 0
    m.register("a0", "a0")
    assert m.rank("a0") == 8 and m.failure("a0") is None


def test_residency_report(make_manager, one):
    m = make_manager(device_adapter_bytes=2 * one)
    m.rank("a0")
    m.prefetch("a0")
    settle(m, ["a0"])
    m.prefetch("a0")
    m.rank("a1")
    report = m.report().to_dict()
    levels = {a["name"]: a["level"] for a in report["adapters"]}
    assert levels["a0"] == "device" and levels["a1"] == "disk"
    assert set(levels.values()) == {"device", "disk"}  # every other adapter of the root is known, on disk
    assert (report["hits"], report["misses"], report["loads"]) == (1, 1, 1)
    assert report["load_ms"]["count"] == 1 and report["device"]["used_bytes"] == one
    infos = {i.name: i.level for i in m.adapter_infos()}
    assert infos == levels


def test_cached_mode_preloads_everything(make_manager):
    m = make_manager(cold_start="cached", device_adapter_bytes=1)
    assert m.pending_loads() == len(SMALL) + 1  # queued at construction, loaded as the step loop polls
    deadline = time.monotonic() + 10
    while m.pending_loads():
        assert time.monotonic() < deadline
        m.poll()
        m.wait_for_progress(0.02)
    assert all(ready(m, n) for n in SMALL + ["big"])  # budget unbounded: nothing was evicted
    assert m.report().device_budget_bytes is None and m.counters.evictions == 0


def test_on_demand_advertises_every_adapter_in_the_root(tiny_model_dir, tiny_adapters, tmp_path):
    """Workers must list disk-level adapters, or the scheduler cannot route their requests."""
    import torch

    from services.gpu_worker.residency.config import ResidencyConfig
    from services.gpu_worker.residency.factory import Model, make_residency
    from shared.llama_shape import LlamaShape

    import shutil

    root = tmp_path / "root"
    for name, path in tiny_adapters.items():
        shutil.copytree(path, root / name)
    manager = make_residency(ResidencyConfig(adapter_dir=str(root), cold_start="on_demand"),
                             Model(LlamaShape.from_model_dir(tiny_model_dir), 64, torch.float32, "cpu", 256)).residency
    try:
        infos = {i.name: i.level for i in manager.adapter_infos()}
        assert set(infos) == set(tiny_adapters)
        assert set(infos.values()) == {"disk"}
    finally:
        manager.close()


def test_demote_moves_an_idle_adapter_to_host_or_disk(make_manager, one):
    m = make_manager(device_adapter_bytes=2 * one)
    settle(m, ["a0", "a1"])
    m.demote("a0", "host")
    assert m.level("a0") == "host" and "a0" not in m.cache and m.cache.used_bytes == one
    m.demote("a1", "disk")
    assert m.level("a1") == "disk" and not m.host_store.contains("a1")
    settle(m, ["a1"])  # a later request loads it again
    assert m.level("a1") == "device"


def test_demote_refuses_an_adapter_in_use_or_a_bad_level(make_manager, one):
    m = make_manager(device_adapter_bytes=2 * one)
    settle(m, ["a0"])
    m.acquire("a0", "a0", Admit.DEVICE)
    with pytest.raises(ValueError, match="in use"):
        m.demote("a0", "host")
    assert m.level("a0") == "device"
    m.release("a0", "a0")
    with pytest.raises(ValueError, match="level"):
        m.demote("a0", "device")
    with pytest.raises(ValueError, match="unknown"):
        m.demote("nope", "host")


def test_warm_host_copies_the_roots_adapters_into_host_memory_within_the_budget(make_manager, one):
    m = make_manager(warm_host=True, host_adapter_bytes=2 * one)
    m._warmer.join(10)
    levels = {a.name: a.level for a in m.report().adapters}
    assert sorted(levels.values()).count("host") == 2  # as many as the budget holds, no eviction
    assert set(levels.values()) == {"host", "disk"}
    cold = next(name for name, level in levels.items() if level == "disk")
    m.register(cold, cold)  # a registration warms only while the budget has room
    assert m.host_store.used_bytes <= 2 * one and m.level(cold) == "disk"
