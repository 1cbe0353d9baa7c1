"""The device tier of adapter residency: a byte budget, allocated by rank, evicted LRU.

Each adapter is stored at its exact rank (A ``[in, r]``, B ``[r, out]`` per module), so it
costs its own bytes: a rank-8 adapter takes about 1/8 of the space of a rank-64 one. An
entry is reserved when its load starts (its bytes count from then on) and becomes
``resident`` when every layer group has landed.

Eviction takes the least recently used entries that are resident, not in use by a
running request, not pinned and not ``fresh`` (just loaded for a request that has not
started yet); loading, in-use and pinned entries are never evicted. When a load cannot
fit, :meth:`DeviceCache.drain` marks least recently used in-use entries ``draining``: they
take no new requests, and are evicted once their running requests finish, so a waiting
load is never starved by adapters that stay busy.
An entry removed while in use (the adapter was unloaded) is only marked ``doomed`` and
freed when its last user releases it. Not thread-safe: the step loop owns it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from shared.peft_adapter import LoraAdapter


class CacheFullError(RuntimeError):
    """A reservation does not fit even after evicting everything evictable."""


@dataclass
class CacheEntry:
    """One adapter's device copy; ``adapter.weights`` fills in as layer groups land."""

    name: str
    nbytes: int
    adapter: LoraAdapter
    pinned: bool = False
    resident: bool = False
    users: int = 0
    doomed: bool = False
    fresh: bool = False
    draining: bool = False
    resident_layers: set[int] = field(default_factory=set)

    @property
    def evictable(self) -> bool:
        return self.resident and not self.users and not self.pinned and not self.fresh

    @property
    def usable(self) -> bool:
        """May a new request start on this entry?"""
        return self.resident and not self.doomed and not self.draining


class DeviceCache:
    """Byte-budgeted adapter slots on the device, least recently used first."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()

    def get(self, name: str) -> CacheEntry | None:
        return self._entries.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def entries(self) -> list[CacheEntry]:
        """Every entry, least recently used first."""
        return list(self._entries.values())

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    @property
    def pinned_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.pinned)

    def evictable_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values() if e.evictable)

    def draining_bytes(self) -> int:
        """Bytes of draining entries still in use (they come free as their requests finish)."""
        return sum(e.nbytes for e in self._entries.values() if e.draining and not e.evictable)

    def drain(self, nbytes: int) -> list[str]:
        """Mark least recently used in-use entries draining until ``nbytes`` more will come free.

        Fresh entries are left alone: the requests they were loaded for came before the load
        that needs the space.
        """
        marked = []
        for entry in self._entries.values():
            if nbytes <= 0:
                break
            if entry.resident and entry.users and not entry.pinned and not entry.draining:
                entry.draining = True
                marked.append(entry.name)
                nbytes -= entry.nbytes
        return marked

    def undrain(self) -> None:
        """Clear every draining mark (recomputed at each poll)."""
        for entry in self._entries.values():
            entry.draining = False

    def can_reserve(self, nbytes: int) -> bool:
        """Would ``nbytes`` fit after evicting every evictable entry?"""
        return nbytes <= self.free_bytes + self.evictable_bytes()

    def reserve(self, name: str, nbytes: int, adapter: LoraAdapter, pinned: bool = False) -> list[str]:
        """Reserve space for ``name`` (evicting LRU entries as needed); returns the evicted names.

        Raises CacheFullError when it cannot fit, ValueError when ``name`` is already present.
        """
        if name in self._entries:
            raise ValueError(f"adapter '{name}' already has a device entry")
        if not self.can_reserve(nbytes):
            raise CacheFullError(f"adapter '{name}' needs {nbytes} bytes; {self.free_bytes} free of "
                                 f"{self.budget_bytes} and {self.evictable_bytes()} evictable")
        evicted = []
        for entry in list(self._entries.values()):
            if self.free_bytes >= nbytes:
                break
            if entry.evictable:
                self._drop(entry.name)
                self.evictions += 1
                evicted.append(entry.name)
        self._entries[name] = CacheEntry(name, nbytes, adapter, pinned)
        self.used_bytes += nbytes
        return evicted

    def touch(self, name: str) -> None:
        """Mark ``name`` most recently used."""
        if name in self._entries:
            self._entries.move_to_end(name)

    def acquire(self, name: str) -> None:
        """A request of ``name`` starts running: it cannot be evicted until released."""
        entry = self._entries[name]
        entry.users += 1
        self._entries.move_to_end(name)

    def release(self, name: str) -> None:
        """A request of ``name`` stopped running; frees a doomed entry with its last user."""
        entry = self._entries.get(name)
        if entry is None:
            return
        entry.users = max(0, entry.users - 1)
        if entry.doomed and not entry.users:
            self._drop(name)

    def remove(self, name: str) -> bool:
        """Free ``name`` now (True), or mark it doomed while requests still use it (False)."""
        entry = self._entries.get(name)
        if entry is None:
            return True
        if entry.users:
            entry.doomed = True
            return False
        self._drop(name)
        return True

    def _drop(self, name: str) -> None:
        entry = self._entries.pop(name)
        self.used_bytes -= entry.nbytes
