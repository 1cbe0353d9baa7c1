"""Discrete-event simulation of N workers under a routing policy.

Each worker runs the engine's iteration loop with continuous batching:

- at every step boundary, if requests wait and the running batch has room
  (``max_batch``), one prefill step admits them in FIFO order (up to
  ``max_prefill_tokens`` prompt tokens, at least one request) and pauses decoding;
  it lasts ``Pre(admitted)`` plus the largest cold-start cost among them; each
  admitted request has its first token when it ends;
- otherwise one decode step gives every running request one token and lasts
  ``Dec(running)``, the context of each request growing by one token per step.

Latencies come from a :class:`PerfModel`. A heterogeneous fleet is a list of
:class:`WorkerGroup`s, ``count`` workers each timed by the group's own model (decode runs,
prefills, cold starts); each worker's view carries that model (``WorkerView.perf``), so
rank_aware prices every worker by its own costs, as the scheduler does with the profiles
its workers publish. A bare model means ``config.workers`` workers of it.

Runs of decode steps between two state changes (an admission, a completion) are computed
in closed form (``LinearCost.run_time``), so events scale with requests, not with tokens.
A request routed to a decoding worker with room is admitted at the end of the step in
flight.

Routing calls the scheduler's own policy objects (``policies.py``) on
:class:`WorkerView`s that the event loop keeps current through the same methods the
scheduler uses; a view reflects its worker as of the worker's last state change.

Residency: with ``adapter_slots`` = 0 every adapter is always on every device (the
paper's CACHED setting); otherwise each device caches that many adapters, LRU,
never evicting one in use, and every adapter is in host memory, so a cold adapter
costs the profile's host-level cold start.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from services.scheduler.policies import NoCapacity, Policy, PolicyRequest
from services.scheduler.worker_view import WorkerView
from services.scheduler.sim.workload import Workload
from shared.batch_stats import BatchStats
from shared.config import option, require
from shared.levels import Level
from shared.perf_model import PerfModel

IDLE, PREFILL, DECODE = 0, 1, 2


@dataclass
class SimulatorConfig:
    """The simulated cluster."""

    workers: int = option(8, "number of workers (of a single profile; worker groups give their own counts)")
    max_batch: int = option(32, "max running requests per worker")
    max_prefill_tokens: int = option(4096, "prompt tokens one prefill step admits (at least one request)")
    adapter_slots: int = option(0, "adapters each device caches (LRU); 0: all adapters always resident")

    def __post_init__(self) -> None:
        require(self.workers >= 1, "workers must be >= 1")
        require(self.max_batch >= 1, "max_batch must be >= 1")
        require(self.max_prefill_tokens >= 1, "max_prefill_tokens must be >= 1")
        require(self.adapter_slots >= 0, "adapter_slots must be >= 0")


@dataclass(frozen=True)
class WorkerGroup:
    """``count`` simulated workers of one kind of device, timed by (and priced with) ``perf``."""

    perf: PerfModel
    count: int

    def __post_init__(self) -> None:
        require(self.count >= 1, f"a worker group needs count >= 1, got {self.count}")


Fleet = PerfModel | Sequence[WorkerGroup]  # a bare model: SimulatorConfig.workers workers of it


def worker_groups(fleet: Fleet, workers: int) -> tuple[WorkerGroup, ...]:
    """The fleet as groups: a bare model becomes one group of ``workers`` workers."""
    if isinstance(fleet, PerfModel):
        return (WorkerGroup(fleet, workers),)
    groups = tuple(fleet)
    require(len(groups) > 0, "a fleet needs at least one worker group")
    return groups


@dataclass
class SimResult:
    """Per-request outcome arrays (seconds); NaN where a request was rejected."""

    arrival_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    output_tokens: np.ndarray
    worker: np.ndarray  # index of the worker it ran on, -1 when rejected
    rejected: np.ndarray  # bool


class _Worker:
    __slots__ = ("index", "view", "perf", "queue", "prefilling", "finishing", "step", "phase", "run_start",
                 "run_steps", "version", "lru")

    def __init__(self, index: int, view: WorkerView, perf: PerfModel, lru: OrderedDict | None) -> None:
        self.index = index
        self.view = view
        self.perf = perf  # its group's model: its step and cold-start times
        self.queue: deque[int] = deque()  # waiting requests, FIFO
        self.prefilling: list[int] = []  # requests in the prefill step in flight
        self.finishing: list[tuple[int, int]] = []  # heap of (step it finishes at, request)
        self.step = 0  # decode steps done
        self.phase = IDLE
        self.run_start = 0.0
        self.run_steps = 0
        self.version = 0
        self.lru = lru


class Simulator:
    """One run of a workload on a fleet under one policy."""

    def __init__(self, fleet: Fleet, workload: Workload, policy: Policy, config: SimulatorConfig) -> None:
        self.groups = worker_groups(fleet, config.workers)
        self.policy, self.config = policy, config
        self.wl = workload
        names = [f"adapter-{i}" for i in range(len(workload.adapter_ranks))]
        everything = frozenset(names)
        self.arrival = (workload.arrival_s * 1e6).tolist()  # microseconds
        self.rank = workload.rank.tolist()
        self.prompt = workload.prompt_tokens.tolist()
        self.output = workload.output_tokens.tolist()
        self.adapter: list[Hashable] = [names[a] for a in workload.adapter.tolist()]
        n = len(self.arrival)
        self.first = [float("nan")] * n
        self.finish = [float("nan")] * n
        self.placed = [-1] * n
        self.workers: list[_Worker] = []
        for group in self.groups:
            for _ in range(group.count):
                i = len(self.workers)
                lru: OrderedDict | None = OrderedDict() if config.adapter_slots else None
                view = WorkerView(f"w{i}", config.max_batch, resident=everything if lru is None else lru,
                                  host=everything, perf=group.perf)
                self.workers.append(_Worker(i, view, group.perf, lru))
        self.views = [w.view for w in self.workers]
        self.by_id = {w.view.worker_id: w for w in self.workers}
        self.events: list[tuple[float, int, int, int]] = []  # (time, seq, worker, version)
        self.seq = 0

    # ---- main loop ------------------------------------------------------------------
    def run(self) -> SimResult:
        events, views, choose = self.events, self.views, self.policy.choose
        rank, prompt, adapter = self.rank, self.prompt, self.adapter
        for i, t in enumerate(self.arrival):
            while events and events[0][0] <= t:
                self._pop_event()
            decision = choose(views, PolicyRequest(rank[i], prompt[i], adapter[i]))
            if isinstance(decision, NoCapacity):
                continue
            self._enqueue(self.by_id[decision], i, t)
        while events:
            self._pop_event()
        return self._result()

    def _pop_event(self) -> None:
        t, _, index, version = heapq.heappop(self.events)
        w = self.workers[index]
        if version == w.version:
            self._boundary(w, t)

    def _schedule(self, w: _Worker, t: float) -> None:
        w.version += 1
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, w.index, w.version))

    def _enqueue(self, w: _Worker, i: int, t: float) -> None:
        self.placed[i] = w.index
        w.view.add_waiting(self.rank[i], self.prompt[i], self.adapter[i])
        w.queue.append(i)
        if w.phase == IDLE:
            self._start_step(w, t)
        elif w.phase == DECODE and w.view.running.count < self.config.max_batch:
            self._cut_run(w, t)

    def _cut_run(self, w: _Worker, t: float) -> None:
        """End the decode run at the first step boundary at or after ``t``."""
        dec, running = w.perf.decode, w.view.running
        done = dec.steps_within(running, t - w.run_start, w.run_steps)
        steps = min(done + 1, w.run_steps)
        if steps < w.run_steps:
            w.run_steps = steps
            self._schedule(w, w.run_start + dec.run_time(running, steps))

    # ---- worker state changes -----------------------------------------------------------
    def _boundary(self, w: _Worker, t: float) -> None:
        if w.phase == PREFILL:
            self._end_prefill(w, t)
        elif w.phase == DECODE:
            self._end_run(w, t)
        self._start_step(w, t)

    def _end_prefill(self, w: _Worker, t: float) -> None:
        for i in w.prefilling:
            self.first[i] = t
            if self.output[i] == 1:
                self.finish[i] = t
                w.view.finish(self.rank[i], self.prompt[i], self.adapter[i])
            else:
                heapq.heappush(w.finishing, (w.step + self.output[i] - 1, i))

    def _end_run(self, w: _Worker, t: float) -> None:
        w.step += w.run_steps
        w.view.advance(w.run_steps)
        finishing, step, view = w.finishing, w.step, w.view
        while finishing and finishing[0][0] <= step:
            i = heapq.heappop(finishing)[1]
            self.finish[i] = t
            view.finish(self.rank[i], self.prompt[i] + self.output[i] - 1, self.adapter[i])

    def _start_step(self, w: _Worker, t: float) -> None:
        running = w.view.running
        if w.queue and running.count < self.config.max_batch:
            self._start_prefill(w, t)
        elif running.count:
            w.phase = DECODE
            w.run_start = t
            w.run_steps = w.finishing[0][0] - w.step
            self._schedule(w, t + w.perf.decode.run_time(running, w.run_steps))
        else:
            w.phase = IDLE

    def _start_prefill(self, w: _Worker, t: float) -> None:
        view, queue = w.view, w.queue
        room = self.config.max_batch - view.running.count
        budget = self.config.max_prefill_tokens
        batch, stats, cold = [], BatchStats(), 0.0
        while queue and len(batch) < room:
            i = queue[0]
            if batch and stats.sum_tokens + self.prompt[i] > budget:
                break
            queue.popleft()
            r, p, a = self.rank[i], self.prompt[i], self.adapter[i]
            view.admit(r, p, a)
            stats.add(r, p, a)
            cold = max(cold, self._make_resident(w, r, p, a))
            batch.append(i)
        w.prefilling = batch
        w.phase = PREFILL
        self._schedule(w, t + w.perf.prefill_us(stats) + cold)

    def _make_resident(self, w: _Worker, rank: int, tokens: int, adapter: Hashable) -> float:
        """Touch the adapter in the device LRU; its cold-start cost if it was not there."""
        lru = w.lru
        if lru is None:
            return 0.0
        if adapter in lru:
            lru.move_to_end(adapter)
            return 0.0
        lru[adapter] = None
        if len(lru) > self.config.adapter_slots:
            in_use = w.view.running
            for old in list(lru):
                if len(lru) <= self.config.adapter_slots:
                    break
                if old != adapter and not in_use.has_adapter(old):
                    del lru[old]
        return w.perf.cold_us(rank, tokens, Level.HOST, w.view.assist_cores)

    def _result(self) -> SimResult:
        placed = np.asarray(self.placed, dtype=np.int64)
        return SimResult(self.wl.arrival_s.copy(), np.asarray(self.first) / 1e6, np.asarray(self.finish) / 1e6,
                         self.wl.output_tokens.copy(), placed, placed < 0)


def simulate(fleet: Fleet, workload: Workload, policy: Policy, config: SimulatorConfig) -> SimResult:
    """Run ``workload`` on ``fleet`` (a model: ``config.workers`` workers of it) routed by ``policy``."""
    return Simulator(fleet, workload, policy, config).run()

