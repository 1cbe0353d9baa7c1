"""The most capacity rank grouping can add: full rank-homogeneous batches vs mixed ones.

Near saturation every worker holds ``max_batch`` requests, so its throughput is one
over the worker time a request costs::

    work(batch) = (output - 1) * Dec(batch) / max_batch + Pre(the request alone)

the decode step shared by the batch plus the request's own prefill, with contexts at
the mean ``prompt + (output - 1) / 2`` (as in ``PerfModel.no_lora_tpt_us``) and ranks
drawn uniformly from ``ranks``:

- mixed: a batch of ``max_batch`` random requests; BGMV pads it to its max rank,
  whose expectation is ``sum_m m * (F(m)^B - F(m-)^B)`` (F: the rank CDF, B:
  ``max_batch``); both models are linear in the max rank and in the sum of ranks,
  so the expected step is the step at the expected max and the mean sum;
- grouped: every batch holds a single rank, and workers are shared out in proportion
  to each rank's work, so a request costs the mean of ``work(batch of its rank)``.

``bound = work_mixed / work_grouped`` caps what grouping can add to the load a cluster
sustains. Under MBGMV the decode step depends on the sum of ranks and the prefill on
the sum of tokens x rank, neither of which grouping changes, so the bound is 1: any
gain there comes from balancing step times, batching prefills, co-locating an
adapter's requests and queueing, not from grouping.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.perf_model import PerfModel


@dataclass(frozen=True)
class GroupingBound:
    """Worker time per request (us) with mixed and with rank-homogeneous full batches."""

    max_batch: int
    expected_max_rank: float
    step_mixed_us: float
    step_grouped_us: dict[int, float]
    work_mixed_us: float
    work_grouped_us: float

    @property
    def bound(self) -> float:
        """The most grouping can multiply capacity by."""
        return self.work_mixed_us / self.work_grouped_us

    def capacity_rps(self, workers: int) -> tuple[float, float]:
        """(mixed, grouped) saturation throughput of ``workers`` workers, requests/s."""
        return workers * 1e6 / self.work_mixed_us, workers * 1e6 / self.work_grouped_us

    def to_dict(self, workers: int) -> dict:
        mixed, grouped = self.capacity_rps(workers)
        return {"max_batch": self.max_batch, "expected_max_rank": self.expected_max_rank,
                "step_mixed_ms": self.step_mixed_us / 1e3,
                "step_grouped_ms": {str(r): s / 1e3 for r, s in self.step_grouped_us.items()},
                "work_mixed_ms": self.work_mixed_us / 1e3, "work_grouped_ms": self.work_grouped_us / 1e3,
                "bound": self.bound, "capacity_mixed_rps": mixed, "capacity_grouped_rps": grouped}


def expected_max_rank(ranks: Sequence[int], batch: int) -> float:
    """E[max rank] of ``batch`` ranks drawn uniformly from ``ranks``."""
    values = sorted(set(ranks))
    share = {r: ranks.count(r) / len(ranks) for r in values}
    below, expected = 0.0, 0.0
    for r in values:
        upto = below + share[r]
        expected += r * (upto ** batch - below ** batch)
        below = upto
    return expected


def _step(perf: PerfModel, batch: int, sum_rank: float, max_rank: float, context: float) -> float:
    tokens = batch * context
    return perf.decode.cost_of(batch, sum_rank, max_rank, tokens, context * sum_rank,
                               batch * context * context, batch)


def _prefill(perf: PerfModel, rank: int, prompt: float) -> float:
    return perf.prefill.cost_of(1, rank, rank, prompt, prompt * rank, prompt * prompt, 1)


def grouping_bound(perf: PerfModel, ranks: Sequence[int], max_batch: int, prompt_tokens: float,
                   output_tokens: float) -> GroupingBound:
    """Mixed vs rank-homogeneous work per request at full batches (module docstring)."""
    if not ranks or max_batch < 1 or prompt_tokens < 0 or output_tokens < 1:
        raise ValueError("grouping_bound needs ranks, max_batch >= 1, prompt >= 0, output >= 1")
    ranks = list(ranks)
    context = prompt_tokens + (output_tokens - 1) / 2
    mean_rank = sum(ranks) / len(ranks)
    top = expected_max_rank(ranks, max_batch)
    mixed_step = _step(perf, max_batch, max_batch * mean_rank, top, context)
    decode_share = (output_tokens - 1) / max_batch
    prefill = sum(_prefill(perf, r, prompt_tokens) for r in ranks) / len(ranks)
    grouped = {r: _step(perf, max_batch, max_batch * r, r, context) for r in sorted(set(ranks))}
    work_grouped = sum(decode_share * grouped[r] for r in ranks) / len(ranks) + prefill
    return GroupingBound(max_batch, top, mixed_step, grouped, decode_share * mixed_step + prefill, work_grouped)
