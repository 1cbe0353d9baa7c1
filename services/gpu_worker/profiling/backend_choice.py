"""Backend ``auto``: which kernel family a worker's profiles predict faster for its adapters.

The rule: take a reference batch of ``REFERENCE_BATCH`` requests whose ranks cycle through
the ranks the worker serves (each request its own adapter), with ``REFERENCE_PROMPT`` prompt
tokens and ``REFERENCE_OUTPUT`` output tokens each. Its cost per output token on a family is
one decode step at the mean context plus the batch's prefill spread over the output,
``Dec(S) + Pre(S) / REFERENCE_OUTPUT``. The family with the lower cost wins; a tie (or no
adapters) keeps ``AUTO_START`` (mbgmv).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from shared.backends import AUTO_START
from shared.batch_stats import BatchStats
from shared.perf_model import PerfModel

REFERENCE_BATCH = 32
REFERENCE_PROMPT = 128
REFERENCE_OUTPUT = 128


def reference_batch(ranks: Sequence[int], context: int) -> BatchStats:
    """REFERENCE_BATCH requests at ``context`` tokens, ranks cycling through ``ranks`` (0: base)."""
    cycle = list(ranks) or [0]
    picked = [cycle[i % len(cycle)] for i in range(REFERENCE_BATCH)]
    adapters = [f"adapter{i}" if r else None for i, r in enumerate(picked)]
    return BatchStats.from_requests(picked, [context] * REFERENCE_BATCH, adapters)


def cost_per_token_us(model: PerfModel, ranks: Sequence[int]) -> float:
    """The rule's cost per output token (us) of ``model`` for ``ranks``."""
    decode = reference_batch(ranks, REFERENCE_PROMPT + REFERENCE_OUTPUT // 2)
    prefill = reference_batch(ranks, REFERENCE_PROMPT)
    return model.decode_us(decode) + model.prefill_us(prefill) / REFERENCE_OUTPUT


def faster_backend(models: Mapping[str, PerfModel], ranks: Sequence[int]) -> tuple[str, dict[str, float]]:
    """(the family to serve with, each family's cost per output token in us)."""
    costs = {backend: cost_per_token_us(model, ranks) for backend, model in models.items()}
    if not any(ranks):  # no adapters: the families run the same base path, their fits differ by noise
        return AUTO_START, costs
    best = min(costs.values())
    winners = [b for b, c in costs.items() if c <= best * (1 + 1e-9)]
    return (AUTO_START if AUTO_START in winners else winners[0]), costs
