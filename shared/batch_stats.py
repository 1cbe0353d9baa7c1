"""Incremental aggregates of a set of requests, as the performance model needs them.

A :class:`BatchStats` summarises a set of requests (a worker's running batch, its
queue, or a profiled batch) by the sums the perf model's terms are built from:

- ``count``: number of requests;
- ``sum_rank`` and ``max_rank``: LoRA ranks (0 means no adapter);
- ``sum_tokens``: tokens per request summed (context length for running
  requests, prompt length for queued ones);
- ``sum_token_rank``: sum of tokens_i * rank_i;
- ``sum_tokens_sq``: sum of tokens_i ** 2 (attention's quadratic prefill term);
- the number of distinct adapters.

``add``/``remove`` are O(1) except when a rank value appears or disappears, which
costs O(#distinct ranks) (a sorted list of the ranks present keeps ``max_rank``
exact under removal). ``advance(k)`` adds k tokens to every member in O(1).
``with_request`` style what-if questions are answered by the perf model from these
sums without looping over requests; ``rank_split`` answers what the max rank falls
back to when the higher ranks leave.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Iterable, Sequence

MAX_RANK = 1024


class BatchStatsError(ValueError):
    """An invalid add/remove (bad rank or tokens, or removing a request never added)."""


class BatchStats:
    """Sums over a multiset of (rank, tokens, adapter) requests; see the module docstring."""

    __slots__ = ("count", "sum_rank", "max_rank", "sum_tokens", "sum_token_rank", "sum_tokens_sq",
                 "adapters", "_rank_counts", "_ranks", "_adapter_counts")

    def __init__(self) -> None:
        self.count = 0
        self.sum_rank = 0
        self.max_rank = 0  # largest rank present, 0 when empty
        self.adapters = 0  # distinct adapters (requests without one are not counted)
        self.sum_tokens = 0
        self.sum_token_rank = 0
        self.sum_tokens_sq = 0
        self._rank_counts: dict[int, int] = {}
        self._ranks: list[int] = []  # distinct ranks present, ascending
        self._adapter_counts: dict[Hashable, int] = {}

    @classmethod
    def from_requests(cls, ranks: Sequence[int], tokens: Sequence[int] | None = None,
                      adapters: Sequence[Hashable | None] | None = None) -> "BatchStats":
        """Aggregate parallel lists (tokens default to 0, adapters to none)."""
        n = len(ranks)
        if tokens is not None and len(tokens) != n or adapters is not None and len(adapters) != n:
            raise BatchStatsError("ranks, tokens and adapters must have the same length")
        stats = cls()
        for i, rank in enumerate(ranks):
            stats.add(int(rank), 0 if tokens is None else int(tokens[i]),
                      None if adapters is None else adapters[i])
        return stats

    def has_adapter(self, adapter: Hashable | None) -> bool:
        return adapter is not None and adapter in self._adapter_counts

    def rank_split(self, rank: int) -> tuple[int, int]:
        """(requests of rank >= ``rank``, the largest rank present below ``rank`` or 0 if none).

        O(#distinct ranks): what a BGMV batch's max rank falls back to once the
        requests at or above ``rank`` have left.
        """
        ranks = self._ranks
        i = bisect.bisect_left(ranks, rank)
        if i == 0:
            return self.count, 0
        counts, below = self._rank_counts, 0
        for j in range(i):
            below += counts[ranks[j]]
        return self.count - below, ranks[i - 1]

    def rank_counts(self) -> dict[int, int]:
        """A copy of the rank histogram {rank: requests}."""
        return dict(self._rank_counts)

    def adapter_counts(self) -> dict[Hashable, int]:
        """A copy of the adapter histogram {adapter: requests} (requests without one are not counted)."""
        return dict(self._adapter_counts)

    def add(self, rank: int, tokens: int = 0, adapter: Hashable | None = None) -> None:
        """Add one request of ``rank`` holding ``tokens`` tokens, using ``adapter``."""
        if not 0 <= rank <= MAX_RANK:
            raise BatchStatsError(f"rank must be in [0, {MAX_RANK}], got {rank!r}")
        if tokens < 0:
            raise BatchStatsError(f"tokens must be >= 0, got {tokens!r}")
        self.count += 1
        self.sum_rank += rank
        self.sum_tokens += tokens
        self.sum_token_rank += tokens * rank
        self.sum_tokens_sq += tokens * tokens
        held = self._rank_counts.get(rank, 0)
        if held == 0:
            bisect.insort(self._ranks, rank)
            if rank > self.max_rank:
                self.max_rank = rank
        self._rank_counts[rank] = held + 1
        if adapter is not None:
            uses = self._adapter_counts.get(adapter, 0)
            if uses == 0:
                self.adapters += 1
            self._adapter_counts[adapter] = uses + 1

    def remove(self, rank: int, tokens: int = 0, adapter: Hashable | None = None) -> None:
        """Remove one request added with the same rank and adapter, now holding ``tokens``."""
        held = self._rank_counts.get(rank, 0)
        if held == 0:
            raise BatchStatsError(f"no request of rank {rank!r} to remove")
        if adapter is not None and adapter not in self._adapter_counts:
            raise BatchStatsError(f"no request of adapter {adapter!r} to remove")
        if not 0 <= tokens <= self.sum_tokens:
            raise BatchStatsError(f"tokens {tokens!r} out of range for this batch")
        self.count -= 1
        self.sum_rank -= rank
        self.sum_tokens -= tokens
        self.sum_token_rank -= tokens * rank
        self.sum_tokens_sq -= tokens * tokens
        if held == 1:
            del self._rank_counts[rank]
            self._ranks.pop(bisect.bisect_left(self._ranks, rank))
            self.max_rank = self._ranks[-1] if self._ranks else 0
        else:
            self._rank_counts[rank] = held - 1
        if adapter is not None:
            left = self._adapter_counts[adapter] - 1
            if left:
                self._adapter_counts[adapter] = left
            else:
                del self._adapter_counts[adapter]
                self.adapters -= 1

    def advance(self, steps: int = 1, members: "BatchStats | None" = None) -> None:
        """Add ``steps`` tokens to every request of ``members`` (default: all of this batch).

        ``members`` must be a subset of this batch, given *before* it is advanced
        itself (a worker's total advances by its running subset).
        """
        m = self if members is None else members
        self.sum_tokens_sq += 2 * steps * m.sum_tokens + steps * steps * m.count
        self.sum_token_rank += steps * m.sum_rank
        self.sum_tokens += steps * m.count

    def copy(self) -> "BatchStats":
        other = BatchStats()
        other.count, other.sum_rank, other.sum_tokens = self.count, self.sum_rank, self.sum_tokens
        other.max_rank, other.adapters = self.max_rank, self.adapters
        other.sum_token_rank, other.sum_tokens_sq = self.sum_token_rank, self.sum_tokens_sq
        other._rank_counts = dict(self._rank_counts)
        other._ranks = list(self._ranks)
        other._adapter_counts = dict(self._adapter_counts)
        return other

    def extend(self, requests: Iterable[tuple[int, int, Hashable | None]]) -> None:
        """Add each (rank, tokens, adapter) triple."""
        for rank, tokens, adapter in requests:
            self.add(rank, tokens, adapter)

    def __repr__(self) -> str:
        return (f"BatchStats(count={self.count}, sum_rank={self.sum_rank}, max_rank={self.max_rank}, "
                f"sum_tokens={self.sum_tokens}, adapters={self.adapters})")
