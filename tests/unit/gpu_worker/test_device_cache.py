"""Device cache accounting: bytes by rank, LRU, pinning, in-use and loading entries, draining."""

from __future__ import annotations

import pytest

from services.gpu_worker.residency.device_cache import CacheFullError, DeviceCache
from shared.peft_adapter import LoraAdapter


def _adapter(name: str) -> LoraAdapter:
    return LoraAdapter(name, f"/x/{name}", {})


def _resident(cache: DeviceCache, name: str, nbytes: int, pinned: bool = False) -> list[str]:
    evicted = cache.reserve(name, nbytes, _adapter(name), pinned)
    cache.get(name).resident = True
    return evicted


def test_bytes_are_accounted_per_entry():
    cache = DeviceCache(1000)
    _resident(cache, "r8", 100)
    _resident(cache, "r64", 800)
    assert cache.used_bytes == 900 and cache.free_bytes == 100
    cache.remove("r8")
    assert cache.used_bytes == 800


def test_lru_eviction_order_follows_use():
    cache = DeviceCache(300)
    for name in ("a", "b", "c"):
        _resident(cache, name, 100)
    cache.touch("a")  # b is now least recently used
    assert _resident(cache, "d", 100) == ["b"]
    assert _resident(cache, "e", 150) == ["c", "a"]
    assert [e.name for e in cache.entries()] == ["d", "e"]
    assert cache.evictions == 3


def test_pinned_in_use_and_loading_entries_are_never_evicted():
    cache = DeviceCache(400)
    _resident(cache, "pinned", 100, pinned=True)
    _resident(cache, "busy", 100)
    cache.acquire("busy")
    cache.reserve("loading", 100, _adapter("loading"))  # not resident yet
    _resident(cache, "idle", 100)
    assert cache.can_reserve(100) and not cache.can_reserve(101)
    assert _resident(cache, "new", 100) == ["idle"]
    cache.acquire("new")
    with pytest.raises(CacheFullError):
        cache.reserve("more", 1, _adapter("more"))
    assert {e.name for e in cache.entries()} == {"pinned", "busy", "loading", "new"}


def test_release_makes_evictable_again():
    cache = DeviceCache(100)
    _resident(cache, "a", 100)
    cache.acquire("a")
    cache.acquire("a")
    cache.release("a")
    assert not cache.can_reserve(100)
    cache.release("a")
    assert _resident(cache, "b", 100) == ["a"]


def test_remove_while_in_use_frees_on_last_release():
    cache = DeviceCache(100)
    _resident(cache, "a", 100)
    cache.acquire("a")
    assert cache.remove("a") is False
    assert cache.get("a").doomed and not cache.get("a").usable and cache.used_bytes == 100
    cache.release("a")
    assert "a" not in cache and cache.used_bytes == 0


def test_fresh_entries_wait_for_their_request_and_are_not_drained():
    cache = DeviceCache(100)
    _resident(cache, "a", 100)
    cache.get("a").fresh = True
    assert not cache.can_reserve(100)
    assert cache.drain(100) == [] and cache.get("a").usable
    cache.get("a").fresh = False
    assert cache.can_reserve(100)


def test_drain_marks_least_recently_used_busy_entries():
    cache = DeviceCache(300)
    for name in ("a", "b", "c"):
        _resident(cache, name, 100)
        cache.acquire(name)
    cache.touch("a")
    assert cache.drain(150) == ["b", "c"]
    assert not cache.get("b").usable and cache.get("a").usable
    assert cache.draining_bytes() == 200
    cache.release("b")
    assert cache.draining_bytes() == 100 and cache.can_reserve(100)
    cache.undrain()
    assert cache.get("c").usable and cache.get("b").evictable and not cache.can_reserve(101)


def test_duplicate_reservation_rejected():
    cache = DeviceCache(100)
    cache.reserve("a", 10, _adapter("a"))
    with pytest.raises(ValueError):
        cache.reserve("a", 10, _adapter("a"))
