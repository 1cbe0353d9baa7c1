"""What the routing policies know about one worker.

A :class:`WorkerView` is built by the scheduler from a worker's ``state.<id>`` message
(``WorkerView.build``) and then kept current between messages: each request the
scheduler routes there is added with ``add_waiting`` until a later state message
shows it, so requests in flight are counted by the same incremental sums. The
simulator drives the same methods from its own event loop.

Three :class:`BatchStats` are kept consistent by the methods below:

- ``running``: admitted requests (prefilling or decoding); tokens = current context;
- ``waiting``: requests queued at the worker or routed there and not yet reported;
  tokens = the context it will prefill (the prompt, plus any tokens generated before a re-route);
- ``total``: running + waiting (what a new request would share decode steps with).
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable
from dataclasses import dataclass, field

from shared.batch_stats import BatchStats
from shared.levels import Level
from shared.perf_model import PerfModel
from shared.schemas import RequestLoad


@dataclass(eq=False)
class WorkerView:
    """A worker's load, residency and capacity, as the policies consume it."""

    worker_id: str
    max_batch: int
    running: BatchStats = field(default_factory=BatchStats)
    waiting: BatchStats = field(default_factory=BatchStats)
    total: BatchStats = field(default_factory=BatchStats)
    resident: Collection[Hashable] = field(default_factory=set)  # adapters on the device
    host: Collection[Hashable] = field(default_factory=set)  # adapters in host memory
    free_kv_blocks: int | None = None  # None: unknown, not checked
    block_size: int = 16
    perf: PerfModel | None = None  # this worker's own performance model; None: not known (yet)
    assist_cores: int = 0  # cores of its healthy CPU-assisted prefill pool; 0: cold adapters wait for loads

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.assist_cores < 0:
            raise ValueError(f"assist_cores must be >= 0, got {self.assist_cores}")

    @classmethod
    def build(cls, worker_id: str, max_batch: int, running: Iterable[RequestLoad] = (),
              waiting: Iterable[RequestLoad] = (), resident: Collection[Hashable] = (),
              host: Collection[Hashable] = (), free_kv_blocks: int | None = None,
              block_size: int = 16, perf: PerfModel | None = None, assist_cores: int = 0) -> "WorkerView":
        """A view from a state message's request lists (loops over requests once, here).

        Each request counts its ``context_tokens``: the current context of a running one, the
        context a waiting one will prefill.
        """
        view = cls(worker_id, max_batch, resident=set(resident), host=set(host),
                   free_kv_blocks=free_kv_blocks, block_size=block_size, perf=perf, assist_cores=assist_cores)
        for r in running:
            view.running.add(r.rank, r.context_tokens, r.adapter)
            view.total.add(r.rank, r.context_tokens, r.adapter)
        for r in waiting:
            view.add_load(r)
        return view

    def add_load(self, load: RequestLoad) -> None:
        """A request routed here (or queued here), as a state message reports it."""
        self.add_waiting(load.rank, load.context_tokens, load.adapter)

    def drop_load(self, load: RequestLoad) -> None:
        """Undo :meth:`add_load` (the request left without being admitted)."""
        self.drop_waiting(load.rank, load.context_tokens, load.adapter)

    def add_waiting(self, rank: int, tokens: int, adapter: Hashable | None = None) -> None:
        """A request routed here (or queued here), not yet admitted; ``tokens`` = prompt."""
        self.waiting.add(rank, tokens, adapter)
        self.total.add(rank, tokens, adapter)

    def drop_waiting(self, rank: int, tokens: int, adapter: Hashable | None = None) -> None:
        """A waiting request left without being admitted (cancelled, re-routed)."""
        self.waiting.remove(rank, tokens, adapter)
        self.total.remove(rank, tokens, adapter)

    def admit(self, rank: int, tokens: int, adapter: Hashable | None = None) -> None:
        """A waiting request starts its prefill; ``tokens`` = prompt."""
        self.waiting.remove(rank, tokens, adapter)
        self.running.add(rank, tokens, adapter)

    def finish(self, rank: int, tokens: int, adapter: Hashable | None = None) -> None:
        """A running request leaves; ``tokens`` = its context length now."""
        self.running.remove(rank, tokens, adapter)
        self.total.remove(rank, tokens, adapter)

    def advance(self, steps: int) -> None:
        """``steps`` decode steps ran: every running request holds ``steps`` more tokens."""
        self.total.advance(steps, self.running)
        self.running.advance(steps)

    def residency(self, adapter: Hashable | None) -> Level:
        """Where the adapter is: DEVICE (or no adapter), HOST or DISK."""
        if adapter is None or adapter in self.resident:
            return Level.DEVICE
        return Level.HOST if adapter in self.host else Level.DISK

    def has_room(self, prompt_tokens: int) -> bool:
        """Whether one more request fits the batch (and the KV cache, when known)."""
        if self.total.count + 1 > self.max_batch:
            return False
        if self.free_kv_blocks is None:
            return True
        needed = self.waiting.sum_tokens + prompt_tokens  # queued prompts claim blocks first
        return -(-needed // self.block_size) <= self.free_kv_blocks

    @property
    def load(self) -> int:
        """Requests on this worker, running or waiting."""
        return self.total.count
