"""Which workers are alive, from their ``state.<id>`` heartbeats, and which placed requests they lost.

A worker's liveness is its heartbeat, never the time a request waits for a chunk: a request
may sit in a busy worker's queue, or in a long prefill, for minutes. A request streaming
from a worker registers a :class:`Placement` and a callback; the callback fires once, and
the request is re-routed, when the worker lost it:

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
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.msg import Msg

from shared.schemas import WorkerState

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
    """What the liveness rules read from one WorkerState."""

    worker_id: str
    seq: int
    instance: str
    keys: frozenset[str]  # the keys of the requests it holds, running or queued
    slots: int  # how many requests it holds at most: max_batch_size running + max_queued queued
    backend: str = ""  # the kernel family it runs
    profile: str = ""  # its profile status: pending, failed, "" or the profile's digest
    cpu_prefill: str = "off"  # its CPU prefill pool: off (not cpu_assist), healthy or unhealthy

    @classmethod
    def of(cls, state: WorkerState) -> Heartbeat:
        pool = "off" if state.assist is None else "healthy" if state.assist.pool_healthy else "unhealthy"
        return cls(state.worker_id, state.seq, state.instance, frozenset(state.request_keys()),
                   state.max_batch_size + state.max_queued, state.backend, state.profile, pool)


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


class WorkerWatch:
    """Last states of workers and the placed requests watching them."""

    def __init__(self, timeout_s: float, missing_grace_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.missing_grace_s = missing_grace_s
        self.clock = clock
        self._seen: dict[str, _Seen] = {}
        self._watchers: dict[str, dict[int, _Watcher]] = {}  # worker id -> handle -> watcher
        self._ids = itertools.count()
        self._blind_at = float("-inf")  # when this gateway last could not hear the workers

    # ---- heartbeats ----------------------------------------------------------------------
    def on_state(self, state: WorkerState, msg: Msg | None = None) -> None:
        self.observe(Heartbeat.of(state))

    def observe(self, beat: Heartbeat) -> None:
        """Note a heartbeat and fire the watchers of requests it shows lost."""
        now = self.clock()
        self._seen[beat.worker_id] = _Seen(now, beat)
        for handle, watcher in list(self._watchers.get(beat.worker_id, {}).items()):
            reason = self._judge(watcher, beat, now)
            if reason is not None:
                self._fire(beat.worker_id, handle, reason)

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

    # ---- placed requests -----------------------------------------------------------------
    def watch(self, placement: Placement, on_lost: Callable[[], None]) -> int:
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
