"""Host store: loads in the serving dtype, LRU back to disk-only past the budget, bad adapters."""

from __future__ import annotations

import shutil

import pytest
import torch

from services.gpu_worker.residency.host_store import HostStore
from shared.adapter_registry import AdapterRegistry
from shared.peft_adapter import AdapterError
from tests.unit.gpu_worker.residency_fixtures import residency_root, small_bytes, tiny_shape  # noqa: F401


def _store(shape, budget: int) -> HostStore:
    return HostStore(budget, shape, 64, torch.bfloat16, pin=False)


def test_get_loads_in_serving_dtype_and_counts(residency_root, tiny_shape):
    records = AdapterRegistry(residency_root, dtype_bytes=2)
    store = _store(tiny_shape, 10 ** 6)
    record = records.resolve("a0")
    adapter = store.get(record)
    assert all(a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16 for a, b in adapter.weights.values())
    assert adapter.nbytes == record.nbytes == small_bytes(tiny_shape, dtype_bytes=2)
    assert store.get(record) is adapter
    assert (store.hits, store.misses, store.used_bytes) == (1, 1, record.nbytes)


def test_lru_past_budget_goes_back_to_disk_only(residency_root, tiny_shape):
    records = AdapterRegistry(residency_root, dtype_bytes=2)
    one = records.resolve("a0").nbytes
    store = _store(tiny_shape, 2 * one)
    for name in ("a0", "a1"):
        store.get(records.resolve(name))
    store.get(records.resolve("a0"))  # a1 is now least recently used
    store.get(records.resolve("a2"))
    assert store.names() == ["a0", "a2"] and not store.contains("a1")
    assert store.used_bytes == 2 * one and store.evictions == 1


def test_adapter_larger_than_budget_is_served_not_kept(residency_root, tiny_shape):
    records = AdapterRegistry(residency_root, dtype_bytes=2)
    store = _store(tiny_shape, 100)
    assert store.get(records.resolve("big")).rank == 64
    assert store.names() == [] and store.used_bytes == 0


def test_corrupt_adapter_raises_and_leaves_store_alone(tmp_path, residency_root, bad_adapters, tiny_shape):
    shutil.copytree(residency_root / "a0", tmp_path / "a0")
    shutil.copytree(bad_adapters["nan"], tmp_path / "nan")
    records = AdapterRegistry(tmp_path, dtype_bytes=2)
    store = _store(tiny_shape, 10 ** 6)
    store.get(records.resolve("a0"))
    with pytest.raises(AdapterError, match="NaN"):
        store.get(records.resolve("nan"))
    assert store.names() == ["a0"]


def test_drop_and_path_change(residency_root, tiny_shape):
    records = AdapterRegistry(residency_root, dtype_bytes=2)
    store = _store(tiny_shape, 10 ** 6)
    store.get(records.resolve("a0"))
    store.drop("a0")
    assert not store.contains("a0") and store.used_bytes == 0
    records.register("x", "a1")
    first = store.get(records.lookup("x"))
    records.unregister("x")
    records.register("x", "a2")
    assert store.get(records.lookup("x")) is not first  # a new path is read again
