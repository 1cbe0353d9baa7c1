"""The cold-start benchmark's workload: MAF arrivals and adapter popularity, seeded lengths.

Arrival times come from the 512-adapter MAF trace in ``<repo>/../shared/data/maf`` (one time
in seconds per line after a ``==========`` line); each request's adapter is drawn from
``popularity_512.npy``. The bench takes the first ``n`` arrivals of the trace and rescales
their times by ``scale`` (bench seconds per trace second) so the run fits the time budget.
Prompt and output lengths are drawn uniformly from documented ranges (seeded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRACE_FILE = "maf_trace_512_scale_0.4.txt"
POPULARITY_FILE = "popularity_512.npy"


class WorkloadError(ValueError):
    """The trace or popularity file is missing or malformed."""


@dataclass
class Arrival:
    """One request of the workload: when (bench seconds from start), which adapter, how long."""

    request_id: str
    time_s: float
    adapter: str
    prompt_ids: list[int]
    max_tokens: int


def load_trace(path: Path) -> np.ndarray:
    """Arrival times (seconds, ascending) from a MAF trace file."""
    if not path.is_file():
        raise WorkloadError(f"trace not found: {path}")
    lines = path.read_text().splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip().startswith("=")) + 1
        times = np.array([float(x) for x in lines[start:] if x.strip()])
    except (StopIteration, ValueError) as exc:
        raise WorkloadError(f"malformed trace {path}: {exc}") from None
    if times.size == 0 or np.any(np.diff(times) < 0):
        raise WorkloadError(f"trace {path} is empty or not sorted")
    return times


def load_popularity(path: Path, count: int) -> np.ndarray:
    """The adapter-popularity vector (probabilities summing to 1) of ``count`` adapters."""
    if not path.is_file():
        raise WorkloadError(f"popularity file not found: {path}")
    pop = np.load(path, allow_pickle=False).astype(np.float64)
    if pop.shape != (count,) or np.any(pop < 0) or not np.isclose(pop.sum(), 1.0):
        raise WorkloadError(f"{path}: expected {count} probabilities summing to 1, got shape {pop.shape}")
    return pop / pop.sum()


def time_scale(times: np.ndarray, n: int, window_s: float) -> float:
    """Bench seconds per trace second so that the first ``n`` arrivals span ``window_s``."""
    span = float(times[n - 1] - times[0])
    return window_s / span if span > 0 else 1.0


def build_workload(times: np.ndarray, popularity: np.ndarray, names: list[str], n: int, scale: float,
                   prompt_range: tuple[int, int], output_range: tuple[int, int], vocab: int,
                   seed: int) -> list[Arrival]:
    """The first ``n`` trace arrivals, rescaled, with seeded adapters, prompts and output lengths."""
    rng = np.random.default_rng(seed)
    adapters = rng.choice(len(names), size=n, p=popularity)
    prompt_lens = rng.integers(prompt_range[0], prompt_range[1] + 1, size=n)
    output_lens = rng.integers(output_range[0], output_range[1] + 1, size=n)
    arrivals = []
    for i in range(n):
        prompt = rng.integers(10, vocab - 10, size=int(prompt_lens[i])).tolist()
        arrivals.append(Arrival(f"req-{i:04d}", float((times[i] - times[0]) * scale), names[int(adapters[i])],
                                prompt, int(output_lens[i])))
    return arrivals
