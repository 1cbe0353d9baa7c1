"""The gateway's one view of its workers, fed by their ``state.<id>`` messages alone.

Each worker publishes a WorkerState at ~10 Hz: its load, its capacity and every adapter it
registered (with its rank and tier, disk included). From those the view answers:

* **liveness and capacity**: a worker is live while its last state is at most ``timeout_s``
  old; the live workers' slots bound admission (429) and ``/health`` lists them;
* **the catalog**: the base model (the gateway's own name for it) plus the adapters listed
  in the last state of any worker heard from, with their ranks (``/v1/models``, the
  ``model`` field of requests), and which *live* workers hold each one, in which tier. An
  adapter stays while a quiet worker's last state lists it (its requests then get 503
  ``no_capacity``, not 404); it goes when no worker's last state lists it any more, or when
  it is unloaded through this gateway (:meth:`FleetView.forget`);
* **worker loss**: a request streaming from a worker registers a :class:`Placement` and a
  callback, which fires once, and the request is re-routed, when the worker lost it:

  1. *silent*: the worker published no state for ``timeout_s`` (counted from when the request
     was placed, and from when this gateway last could not hear anyone: while its own NATS
     connection is down it is blind, not a witness of silence);
  2. *restarted*: a state of the worker comes from another ``instance`` than the one that
     accepted the request, or its ``seq`` went backwards (a restarted process counts anew);
  3. *dropped*: states of the same instance newer than ``state_seq`` (the last state the
     worker had published when it accepted the request, so every newer one lists it while the
     worker holds it) no longer list the request's key, in at least two states over at least
     ``missing_grace_s``, and still no final chunk arrived. The grace lets a final chunk that
     was published before such a state reach the relay first.

A worker's liveness is its heartbeat, never the time a request waits for a chunk: a request
may sit in a busy worker's queue, or in a long prefill, for minutes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nats.aio.msg import Msg

from shared.schemas import AdapterInfo, ServiceError, WorkerState

logger = logging.getLogger(__name__)

MISSING_STATES = 2  # a request is dropped once this many newer states in a row omit it


@dataclass(frozen=True)
class Placement:
    """Where a request was placed: the worker, the request's key in its states, and what the worker
    said when it accepted it (``state_seq`` 0 and ``instance`` "" when unknown)."""

    worker_id: str
    key: str
    state_seq: int = 0
    instance: str = ""


@dataclass(frozen=True)
class Heartbeat:
    """What the view reads from one WorkerState."""

    worker_id: str
    seq: int
    instance: str
    keys: frozenset[str]  # the keys of the requests it holds, running or queued
    slots: int  # how many requests it holds at most: max_batch_size running + max_queued queued
    backend: str = ""  # the kernel family it runs
    profile: str = ""  # its profile status: pending, failed, "" or the profile's digest
    cpu_prefill: str = "off"  # its CPU prefill pool: off (not cpu_assist), healthy or unhealthy
    adapters: tuple[AdapterInfo, ...] = ()  # every adapter it registered, with rank and tier

    @classmethod
    def of(cls, state: WorkerState) -> Heartbeat:
        pool = "off" if state.assist is None else "healthy" if state.assist.pool_healthy else "unhealthy"
        return cls(state.worker_id, state.seq, state.instance, frozenset(state.request_keys()),
                   state.max_batch_size + state.max_queued, state.backend, state.profile, pool,
                   tuple(state.adapters))


@dataclass(frozen=True)
class AdapterEntry:
    """One servable adapter: its name, LoRA rank and when this gateway learned of it (Unix seconds)."""

    name: str
    rank: int
    created: int


@dataclass
class _Seen:
    at: float
    beat: Heartbeat


@dataclass
class _Watcher:
    placement: Placement
    since: float
    on_lost: Callable[[], None]
    last_seq: int
    missing: int = 0  # newer states in a row that omit the request
    missing_since: float = 0.0


class FleetView:
    """Last states of the workers: liveness, capacity, the adapter catalog, and placed requests' watchers."""

    def __init__(self, base_model: str, timeout_s: float, missing_grace_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base_model = base_model
        self.created = int(time.time())
        self.timeout_s = timeout_s
        self.missing_grace_s = missing_grace_s
        self.clock = clock
        self._seen: dict[str, _Seen] = {}
        self._held: dict[str, dict[str, AdapterInfo]] = {}  # worker id -> its last adapter list, by name
        self._holders: dict[str, set[str]] = {}  # adapter -> workers whose last list has it
        self._entries: dict[str, AdapterEntry] = {}  # adapter -> its catalog entry
        self._watchers: dict[str, dict[int, _Watcher]] = {}  # worker id -> handle -> watcher
        self._ids = itertools.count()
        self._blind_at = float("-inf")  # when this gateway last could not hear the workers

    # ---- states --------------------------------------------------------------------------
    def on_state(self, state: WorkerState, msg: Msg | None = None) -> None:
        """The ``state.*`` subscription's handler."""
        self.observe(Heartbeat.of(state))

    def observe(self, beat: Heartbeat) -> None:
        """Note a heartbeat and its adapters, and fire the watchers of requests it shows lost."""
        now = self.clock()
        self._seen[beat.worker_id] = _Seen(now, beat)
        self.observe_adapters(beat.worker_id, beat.adapters)
        for handle, watcher in list(self._watchers.get(beat.worker_id, {}).items()):
            reason = self._judge(watcher, beat, now)
            if reason is not None:
                self._fire(beat.worker_id, handle, reason)

    def live_workers(self) -> list[str]:
        now = self.clock()
        return sorted(w for w, seen in self._seen.items() if now - seen.at <= self.timeout_s)

    def known_workers(self) -> list[str]:
        """Every worker heard from since this gateway started."""
        return sorted(self._seen)

    def worker_info(self) -> dict[str, dict[str, str]]:
        """Each live worker's kernel family, profile status and CPU prefill pool (``/health``)."""
        beats = {w: self._seen[w].beat for w in self.live_workers()}
        return {w: {"backend": b.backend, "profile": b.profile, "cpu_prefill": b.cpu_prefill}
                for w, b in beats.items()}

    def capacity(self) -> int:
        """How many requests the live workers hold at most (the sum of their slots)."""
        return sum(self._seen[w].beat.slots for w in self.live_workers())

    # ---- the catalog ---------------------------------------------------------------------
    def observe_adapters(self, worker_id: str, adapters: Iterable[AdapterInfo]) -> None:
        """Record ``worker_id``'s complete adapter list (from its state, or its answer to a load)."""
        listed = {a.name: a for a in adapters}
        for name in self._held.get(worker_id, {}).keys() - listed.keys():
            self._drop_holder(name, worker_id)
        self._held[worker_id] = listed
        for info in listed.values():
            self._add_holder(info, worker_id)

    def forget(self, name: str) -> None:
        """``name`` was unloaded everywhere (a worker that still has it lists it again)."""
        for worker_id in self._holders.pop(name, set()):
            self._held[worker_id].pop(name, None)
        self._entries.pop(name, None)

    def has(self, name: str) -> bool:
        """Whether ``name`` is a known adapter."""
        return name in self._entries and name != self.base_model

    def adapters(self) -> list[AdapterEntry]:
        """The known adapters, by name."""
        return sorted((e for e in self._entries.values() if e.name != self.base_model), key=lambda e: e.name)

    def resolve(self, model: str) -> str | None:
        """The adapter a ``model`` field names (None for the base model); ServiceError if unknown."""
        if model == self.base_model:
            return None
        if self.has(model):
            return model
        raise ServiceError("model_not_found", f"the model {model!r} does not exist")

    def rank_of(self, adapter: str | None) -> int:
        entry = self._entries.get(adapter) if adapter else None
        return entry.rank if entry else 0

    def holders(self, name: str) -> list[dict[str, str]]:
        """``[{"worker": id, "level": device|host|disk}, ...]`` of the live workers holding ``name``."""
        live = set(self.live_workers())
        return [{"worker": w, "level": self._held[w][name].level}
                for w in sorted(self._holders.get(name, ())) if w in live]

    def _add_holder(self, info: AdapterInfo, worker_id: str) -> None:
        self._holders.setdefault(info.name, set()).add(worker_id)
        entry = self._entries.get(info.name)
        if entry is None or entry.rank != info.rank:
            if info.name == self.base_model:
                logger.warning("worker %s lists an adapter named like the base model (%s); ignored", worker_id,
                               info.name)
            self._entries[info.name] = AdapterEntry(info.name, info.rank, int(time.time()))

    def _drop_holder(self, name: str, worker_id: str) -> None:
        holders = self._holders[name]
        holders.discard(worker_id)
        if not holders:
            del self._holders[name]
            self._entries.pop(name, None)

    # ---- placed requests -----------------------------------------------------------------
    def watch(self, placement: Placement, on_lost: Callable[[], None]) -> int:
        """Call ``on_lost`` once if the worker loses the placed request; returns a handle for :meth:`unwatch`."""
        handle = next(self._ids)
        watcher = _Watcher(placement, self.clock(), on_lost, last_seq=placement.state_seq)
        self._watchers.setdefault(placement.worker_id, {})[handle] = watcher
        return handle

    def unwatch(self, handle: int) -> None:
        for worker_id, watchers in self._watchers.items():
            if watchers.pop(handle, None) is not None:
                if not watchers:
                    del self._watchers[worker_id]
                return

    def _judge(self, watcher: _Watcher, beat: Heartbeat, now: float) -> str | None:
        """Why ``beat`` shows the worker lost the watcher's request, or None."""
        placement = watcher.placement
        if placement.instance and beat.instance != placement.instance:
            return "restarted"
        if beat.seq < watcher.last_seq:
            return "restarted"
        watcher.last_seq = beat.seq
        if beat.seq <= placement.state_seq or placement.key in beat.keys:
            watcher.missing = 0
            return None
        if watcher.missing == 0:
            watcher.missing_since = now
        watcher.missing += 1
        if watcher.missing >= MISSING_STATES and now - watcher.missing_since >= self.missing_grace_s:
            return "dropped the request"
        return None

    def is_silent(self, worker_id: str, since: float, now: float) -> bool:
        """Whether ``worker_id``, serving a request placed at ``since``, sent no state for ``timeout_s``."""
        seen = self._seen.get(worker_id)
        reference = max(since, self._blind_at, seen.at if seen is not None else since)
        return now - reference > self.timeout_s

    def sweep(self, connected: bool = True) -> None:
        """Fire the watchers of silent workers; while disconnected, only note that this gateway is blind."""
        now = self.clock()
        if not connected:
            self._blind_at = now
            return
        for worker_id, watchers in list(self._watchers.items()):
            for handle, watcher in list(watchers.items()):
                if self.is_silent(worker_id, watcher.since, now):
                    self._fire(worker_id, handle, "went quiet")

    def _fire(self, worker_id: str, handle: int, reason: str) -> None:
        watcher = self._watchers[worker_id].pop(handle)
        if not self._watchers[worker_id]:
            del self._watchers[worker_id]
        logger.warning("worker %s %s; request %s is re-routed", worker_id, reason, watcher.placement.key)
        watcher.on_lost()

    async def run(self, connected: Callable[[], bool]) -> None:
        """Sweep a few times per timeout, forever."""
        while True:
            await asyncio.sleep(self.timeout_s / 4)
            self.sweep(connected())
