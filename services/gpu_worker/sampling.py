"""Token sampling: greedy, temperature, top-k, top-p, per-request seeded generators.

Sampling never raises for a value the schema accepts, and never for odd logits:

* a temperature below GREEDY_BELOW is greedy (dividing by 1e-300 would overflow every
  logit to infinity and leave no distribution to draw from);
* filtering runs in float64, so a small temperature cannot overflow a float32 logit;
* a NaN logit never wins, a +inf logit takes all the mass (a tie among several is shared);
* top-p always keeps the most likely token, however small ``top_p`` is;
* when the probabilities still hold no finite positive mass, the row falls back to greedy.
"""

from __future__ import annotations

import torch

from services.gpu_worker.request import SamplingParams
from shared.native_ops import greedy_kernel

GREEDY_BELOW = 1e-5  # temperatures smaller than this sample greedily


def is_greedy(params: SamplingParams) -> bool:
    """Whether ``params`` pick the most likely token (temperature 0, or so small it is the same)."""
    return params.temperature < GREEDY_BELOW


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (or from the OS when None)."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logits: [V]`` as float64 with NaN as -inf; when any is +inf, only the +inf ones remain (as 0)."""
    logits = logits.double().nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    top = logits == float("inf")
    if top.any():
        return torch.zeros_like(logits).masked_fill(~top, float("-inf"))
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled float64 ``logits: [V]`` with tokens outside top-k / top-p set to -inf."""
    logits = sanitize_logits(logits) / params.temperature
    if params.top_k and 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p; the first one always stays
        drop = probs.cumsum(-1) - probs >= params.top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor | None:
    """The distribution to draw from for ``logits: [V]``, or None when it holds no usable mass."""
    probs = filter_logits(logits, params).softmax(-1).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    total = float(probs.sum())
    if not total > 0.0 or total == float("inf"):
        return None
    return probs


def greedy_tokens_reference(logits: torch.Tensor) -> list[int]:
    """The most likely token of each row of ``logits: [N, V]`` (NaN never wins; an all-NaN row gives 0)."""
    return logits.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")).argmax(-1).tolist()


def greedy_tokens(logits: torch.Tensor) -> list[int]:
    """:func:`greedy_tokens_reference`, by the native kernel (``csrc/greedy_cpu.cpp``) for float32
    CPU logits: one pass per row, rows in parallel, where torch reads the logits three times."""
    if (logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
            and logits.stride(-1) == 1 and greedy_kernel() is not None):
        return greedy_kernel().greedy_tokens(logits).tolist()
    return greedy_tokens_reference(logits)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits: [N, V]`` (float32, CPU)."""
    greedy = greedy_tokens(logits)
    out = []
    for i, p in enumerate(params):
        probs = None if is_greedy(p) else probabilities(logits[i], p)
        if probs is None:
            out.append(greedy[i])
        else:
            out.append(int(torch.multinomial(probs, 1, generator=generators[i]).item()))
    return out
