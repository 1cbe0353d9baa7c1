"""Synthetic request workloads for the cluster simulator (seeded, reproducible).

- Arrivals: a Poisson process (``rate`` requests/s for ``duration`` s), or a trace
  file in the MAF format of ../shared/data/maf: optional header lines, a line
  ``==========``, then one arrival time in seconds per line.
- Adapters: drawn from a popularity vector (.npy, float, one probability per adapter)
  or uniformly over ``adapters`` adapters. Each adapter gets one rank, drawn
  uniformly from ``ranks``.
- Lengths: prompt and output tokens are independent, each
  ``clip(round(LogNormal(ln(median), sigma)), 1, max)``; defaults: prompt median 96,
  sigma 0.8, max 1024 (mean ~132); output median 128, sigma 0.8, max 512 (mean ~167).
  The first output token comes from the prefill.

Independent seeded streams are used for arrivals, adapters, ranks and lengths, so
changing one knob does not reshuffle the others.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from shared.config import option, require

TRACE_SEPARATOR = "=========="


class WorkloadError(ValueError):
    """A trace or popularity file is malformed, or the workload is mis-specified."""


@dataclass
class WorkloadConfig:
    """What requests arrive, when, and for which adapters."""

    rate: float = option(0.0, "Poisson arrival rate, requests per second")
    duration: float = option(0.0, "Poisson arrivals span this many seconds")
    trace: str = option("", "arrival trace file (MAF format) instead of Poisson")
    popularity: str = option("", "adapter popularity vector (.npy) instead of uniform adapters")
    adapters: int = option(64, "number of adapters when no popularity file is given")
    ranks: tuple[int, ...] = option(default_factory=lambda: (8, 16, 32, 64), cli=False,
                                    help="ranks adapters draw from, uniformly")
    prompt_median: float = option(96.0, "median prompt tokens (log-normal)")
    prompt_sigma: float = option(0.8, "log-normal sigma of prompt tokens")
    prompt_max: int = option(1024, "prompt tokens are clipped to this")
    output_median: float = option(128.0, "median output tokens (log-normal)")
    output_sigma: float = option(0.8, "log-normal sigma of output tokens")
    output_max: int = option(512, "output tokens are clipped to this")
    seed: int = option(0, "workload seed")

    def __post_init__(self) -> None:
        self.ranks = tuple(int(r) for r in self.ranks)
        require(bool(self.trace) != (self.rate > 0), "give either a trace or a positive rate (with a duration)")
        require(self.rate >= 0 and self.duration >= 0, "rate and duration must be >= 0")
        require(bool(self.trace) or self.duration > 0, "a Poisson workload needs duration > 0")
        require(self.adapters >= 1, "adapters must be >= 1")
        require(len(self.ranks) > 0 and all(1 <= r <= 1024 for r in self.ranks), "ranks must be in [1, 1024]")
        require(self.prompt_median >= 1 and self.output_median >= 1, "length medians must be >= 1")
        require(self.prompt_sigma >= 0 and self.output_sigma >= 0, "length sigmas must be >= 0")
        require(self.prompt_max >= 1 and self.output_max >= 1, "length maxima must be >= 1")


@dataclass
class Workload:
    """Requests sorted by arrival; parallel arrays of one entry per request."""

    arrival_s: np.ndarray  # [n] float64, non-decreasing
    adapter: np.ndarray  # [n] int64 adapter index
    rank: np.ndarray  # [n] int64
    prompt_tokens: np.ndarray  # [n] int64 >= 1
    output_tokens: np.ndarray  # [n] int64 >= 1
    adapter_ranks: np.ndarray  # [n_adapters] int64, the rank of each adapter

    def __len__(self) -> int:
        return len(self.arrival_s)


def read_trace(path: str | os.PathLike) -> np.ndarray:
    """Arrival times (seconds, sorted) from a MAF-format trace file."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [ln.strip() for ln in fh]
    except OSError as exc:
        raise WorkloadError(f"cannot read trace {os.fspath(path)}: {exc.strerror or exc}") from exc
    if TRACE_SEPARATOR not in lines:
        raise WorkloadError(f"{os.fspath(path)}: no '{TRACE_SEPARATOR}' line before the arrival times")
    body = [ln for ln in lines[lines.index(TRACE_SEPARATOR) + 1:] if ln]
    try:
        times = np.array([float(ln) for ln in body], dtype=np.float64)
    except ValueError as exc:
        raise WorkloadError(f"{os.fspath(path)}: arrival times must be numbers ({exc})") from exc
    if len(times) == 0:
        raise WorkloadError(f"{os.fspath(path)}: no arrival times")
    if not np.all(np.isfinite(times)) or times.min() < 0:
        raise WorkloadError(f"{os.fspath(path)}: arrival times must be finite and >= 0")
    return np.sort(times)


def read_popularity(path: str | os.PathLike) -> np.ndarray:
    """A normalised popularity vector from a .npy file."""
    try:
        p = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise WorkloadError(f"cannot read popularity {os.fspath(path)}: {exc}") from exc
    if p.ndim != 1 or len(p) == 0 or not np.issubdtype(p.dtype, np.number):
        raise WorkloadError(f"{os.fspath(path)}: popularity must be a non-empty 1-D numeric vector")
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.sum() <= 0:
        raise WorkloadError(f"{os.fspath(path)}: popularity must be finite, >= 0 and not all zero")
    return p / p.sum()


def poisson_arrivals(rate: float, duration: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times of a Poisson process on [0, duration)."""
    n = int(rng.poisson(rate * duration))
    return np.sort(rng.uniform(0.0, duration, size=n))


def lognormal_lengths(median: float, sigma: float, maximum: int, n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.lognormal(math.log(median), sigma, size=n)
    return np.clip(np.rint(x), 1, maximum).astype(np.int64)


def mean_length(median: float, sigma: float, maximum: int, points: int = 4000) -> float:
    """Mean of the clipped, rounded log-normal length (midpoint rule over ``points`` quantiles)."""
    normal = NormalDist()
    z = np.array([normal.inv_cdf((i + 0.5) / points) for i in range(points)])
    x = np.clip(np.rint(np.exp(math.log(median) + sigma * z)), 1, maximum)
    return float(x.mean())


def generate(config: WorkloadConfig) -> Workload:
    """Draw the workload ``config`` describes."""
    seeds = np.random.SeedSequence(config.seed).spawn(4)
    r_arrival, r_adapter, r_rank, r_len = (np.random.default_rng(s) for s in seeds)
    if config.trace:
        arrivals = read_trace(config.trace)
    else:
        arrivals = poisson_arrivals(config.rate, config.duration, r_arrival)
    n = len(arrivals)
    if config.popularity:
        popularity = read_popularity(config.popularity)
        adapter = r_adapter.choice(len(popularity), size=n, p=popularity)
        n_adapters = len(popularity)
    else:
        adapter = r_adapter.integers(0, config.adapters, size=n)
        n_adapters = config.adapters
    adapter_ranks = r_rank.choice(np.asarray(config.ranks, dtype=np.int64), size=n_adapters)
    prompt = lognormal_lengths(config.prompt_median, config.prompt_sigma, config.prompt_max, n, r_len)
    output = lognormal_lengths(config.output_median, config.output_sigma, config.output_max, n, r_len)
    return Workload(arrivals, adapter.astype(np.int64), adapter_ranks[adapter], prompt, output, adapter_ranks)
