"""The scheduler's view of the workers, built from their ``state.<id>`` messages.

A worker is live while its last state is younger than ``dead_after_s`` (N missed heartbeats).
Each worker's load is kept as a policy :class:`WorkerView`, rebuilt from every state message.
Requests the scheduler has just routed to a worker are counted as *pending* (waiting) on it
until a state shows them: either the state lists the request's key, or its ``seq`` is past the ``state_seq``
the worker acknowledged the submit with (so the state was taken after admission), or
``pending_ttl_s`` passes. Routing decisions therefore see their own recent placements and do
not herd onto one worker between two heartbeats.

Each view carries the worker's own performance model, looked up by the profile digest its
state names (``perf_of``, the scheduler's :class:`ProfileBook`), and the cores of its CPU
prefill pool while that pool is healthy, so rank_aware prices it as it would serve.

All methods take ``now`` (monotonic seconds) explicitly; the fleet does no I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from services.scheduler.worker_view import WorkerView
from shared.levels import Level
from shared.perf_model import PerfModel
from shared.schemas import RequestBody, RequestLoad, WorkerState
from shared.schemas.names import request_key

logger = logging.getLogger(__name__)


@dataclass
class PendingRoute:
    """A request routed to a worker that the worker's state does not show yet."""

    load: RequestLoad
    routed_at: float
    ack_seq: int | None = None


@dataclass
class WorkerRecord:
    """The latest state of one worker, when it arrived, the routes it does not show yet, and
    the policy view of all of it."""

    state: WorkerState
    last_seen: float
    perf: PerfModel | None = None  # the model of the profile its state names, once fetched
    pending: dict[str, PendingRoute] = field(default_factory=dict)  # by request key
    view: WorkerView = field(init=False)

    def __post_init__(self) -> None:
        self.rebuild()

    @property
    def worker_id(self) -> str:
        return self.state.worker_id

    def rebuild(self) -> None:
        """Rebuild ``view`` from the state plus the pending routes."""
        state = self.state
        self.view = WorkerView.build(
            state.worker_id, state.max_batch_size,
            running=state.running,
            waiting=list(state.queued) + [p.load for p in self.pending.values()],
            resident={a.name for a in state.adapters if a.level == Level.DEVICE},
            host={a.name for a in state.adapters if a.level == Level.HOST},
            free_kv_blocks=state.free_kv_blocks, block_size=state.block_size, perf=self.perf,
            assist_cores=assist_cores(state))

    def add_pending(self, load: RequestLoad, now: float) -> None:
        self.drop_pending(load.key)
        self.pending[load.key] = PendingRoute(load, now)
        self.view.add_load(load)

    def drop_pending(self, key: str) -> None:
        route = self.pending.pop(key, None)
        if route is not None:
            self.view.drop_load(route.load)

    def adapter_names(self) -> set[str]:
        return {a.name for a in self.state.adapters}


def assist_cores(state: WorkerState) -> int:
    """The cores of the worker's CPU prefill pool while it is healthy (0: cold adapters wait for loads)."""
    assist = state.assist
    return assist.pool_alive if assist is not None and assist.pool_healthy else 0


class Fleet:
    """Live workers by id (see the module docstring)."""

    def __init__(self, dead_after_s: float, pending_ttl_s: float,
                 perf_of: Callable[[str], PerfModel | None] = lambda status: None) -> None:
        self.dead_after_s = dead_after_s
        self.pending_ttl_s = pending_ttl_s
        self.perf_of = perf_of  # profile status (a digest) -> the worker's model, when known
        self._workers: dict[str, WorkerRecord] = {}

    def __len__(self) -> int:
        return len(self._workers)

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._workers.get(worker_id)

    def observe(self, state: WorkerState, now: float) -> bool:
        """Record a state message; True when it brings a worker (back) to life."""
        record = self._workers.get(state.worker_id)
        if record is None or not self._alive(record, now):
            self._workers[state.worker_id] = WorkerRecord(state, now, self.perf_of(state.profile))
            logger.info("worker %s is live (model %s, backend %s)", state.worker_id, state.model, state.backend)
            return True
        if state.seq < record.state.seq or state.instance != record.state.instance:
            # the worker restarted: its old pending routes are gone
            record.pending.clear()
        record.state, record.last_seen, record.perf = state, now, self.perf_of(state.profile)
        self._settle(record, now)
        record.rebuild()
        return False

    def profile_arrived(self, digest: str) -> None:
        """A profile was fetched: reprice the workers whose state names it."""
        for record in self._workers.values():
            if record.state.profile == digest:
                record.perf = self.perf_of(digest)
                record.rebuild()

    def _settle(self, record: WorkerRecord, now: float) -> None:
        """Stop counting the pending routes the new state accounts for (or that are too old)."""
        shown = record.state.request_keys()
        seq = record.state.seq
        for key, route in list(record.pending.items()):
            reflected = key in shown or (route.ack_seq is not None and seq > route.ack_seq)
            if reflected or now - route.routed_at > self.pending_ttl_s:
                del record.pending[key]

    def _alive(self, record: WorkerRecord, now: float) -> bool:
        return now - record.last_seen <= self.dead_after_s

    def live(self, now: float) -> list[WorkerRecord]:
        """Workers heard from within ``dead_after_s``."""
        return [r for r in self._workers.values() if self._alive(r, now)]

    def is_live(self, worker_id: str, now: float) -> bool:
        record = self._workers.get(worker_id)
        return record is not None and self._alive(record, now)

    def candidates(self, request: RequestBody, now: float, exclude: Iterable[str] = ()) -> list[WorkerRecord]:
        """Live workers that can serve ``request``: same base model, the adapter known to them,
        and a context limit that fits the prompt plus the tokens still to generate."""
        excluded = set(exclude)
        needed = request.context_tokens() + request.remaining_tokens()
        return [r for r in self.live(now)
                if r.worker_id not in excluded and r.state.model == request.model
                and (request.adapter is None or request.adapter in r.adapter_names())
                and needed <= r.state.max_model_len]

    def rank_of(self, adapter: str | None) -> int:
        """The adapter's rank as the workers report it (0 for the base model or an unknown adapter)."""
        if adapter is None:
            return 0
        for record in self._workers.values():
            for info in record.state.adapters:
                if info.name == adapter:
                    return info.rank
        return 0

    def reserve(self, worker_id: str, load: RequestLoad, now: float) -> None:
        """Count ``load`` on ``worker_id`` from now until a state shows it."""
        record = self._workers.get(worker_id)
        if record is not None:
            record.add_pending(load, now)

    def confirm(self, worker_id: str, request_id: str, state_seq: int) -> None:
        """The worker acknowledged the request; states after ``state_seq`` account for it."""
        record = self._workers.get(worker_id)
        key = request_key(request_id)
        route = record.pending.get(key) if record is not None else None
        if route is not None:
            route.ack_seq = state_seq
            if record.state.seq > state_seq:
                record.drop_pending(key)

    def release(self, worker_id: str, request_id: str) -> None:
        """Forget a reservation (the submit failed)."""
        record = self._workers.get(worker_id)
        if record is not None:
            record.drop_pending(request_key(request_id))

    def forget(self, worker_id: str) -> None:
        """Drop a worker known to be gone (e.g. nobody answers its submit subject)."""
        if self._workers.pop(worker_id, None) is not None:
            logger.warning("worker %s is gone", worker_id)

    def expire(self, now: float) -> list[str]:
        """Drop workers that missed their heartbeats; return their ids."""
        dead = [w for w, r in self._workers.items() if not self._alive(r, now)]
        for worker_id in dead:
            del self._workers[worker_id]
            logger.warning("worker %s missed its heartbeats; marked dead", worker_id)
        return dead
