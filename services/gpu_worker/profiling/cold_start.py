"""Profiles cold starts: the extra time to first token of a request whose adapter is not on the device.

The engine runs in ``on_demand`` residency mode, the mode a worker pays cold starts in:
a request whose adapter is off the device waits for the load, then prefills. For every
rank and prompt length of a small grid, and for each level the adapter may start at
(``host``: in host memory; ``disk``: only its files, read through the OS page cache as
a worker reads them), one request is timed from ``add_request`` to its first token
twice: with its adapter on the device (warm), and again after
:meth:`~services.gpu_worker.residency.protocol.AdapterResidency.demote` moved it to the level (cold). The sample's latency is
``cold - warm``, the prefill itself cancelling out. Each point is measured ``repeats``
times in shuffled order and keeps its fastest warm and fastest cold time (timing noise
on a shared host only ever adds).

Samples are ``cold_host`` / ``cold_disk`` entries of the profile (``shared/perf_model.py``),
one request each. On a CPU-only host the host-to-device copy is a memory copy, or the
EMULATED link of the residency config when one is set; :func:`link_label` names which.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

from services.gpu_worker.engine import LLMEngine
from services.gpu_worker.request import EngineRequest, SamplingParams
from shared.perf_model import ProfileError

LEVELS = ("host", "disk")
IDLE_WAIT_S = 0.002
FIRST_TOKEN_TIMEOUT_S = 300.0  # a load or prefill that takes longer is an error, not a sample


@dataclass(frozen=True)
class ColdPoint:
    level: str
    rank: int
    prompt_tokens: int


@dataclass
class ColdStartProfiler:
    """Measures ``cold_host`` and ``cold_disk`` samples on an on_demand ``engine``."""

    engine: LLMEngine
    adapters_by_rank: dict[int, list[str]]
    prompt_lengths: tuple[int, ...]
    repeats: int = 3
    seed: int = 0
    progress: Callable[[int, int], None] = lambda done, total: None
    _serial: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.engine.residency.report().mode != "on_demand":
            raise ProfileError("cold-start profiling needs an engine in on_demand mode")

    def grid(self) -> list[ColdPoint]:
        return [ColdPoint(level, rank, tokens) for level in LEVELS for rank in sorted(self.adapters_by_rank)
                for tokens in self.prompt_lengths]

    def run(self) -> list[dict]:
        """The samples, one per grid point: ``latency_us`` = fastest cold - fastest warm."""
        points = self.grid()
        warm = [float("inf")] * len(points)
        cold = [float("inf")] * len(points)
        order = random.Random(self.seed + 2)
        done, total = 0, len(points) * self.repeats
        for _ in range(self.repeats):
            for i in order.sample(range(len(points)), len(points)):
                w, c = self._measure(points[i], i)
                warm[i], cold[i] = min(warm[i], w), min(cold[i], c)
                done += 1
                self.progress(done, total)
        return [_sample(p, self._adapter(p, i), max(0.0, cold[i] - warm[i])) for i, p in enumerate(points)]

    def _adapter(self, point: ColdPoint, index: int) -> str:
        names = self.adapters_by_rank[point.rank]
        return names[index % len(names)]

    def _measure(self, point: ColdPoint, index: int) -> tuple[float, float]:
        """(warm, cold) time to first token in us of one request at ``point``."""
        adapter = self._adapter(point, index)
        rng = random.Random(self.seed * 7919 + index)
        vocab = self.engine.model.config.vocab_size
        prompt = [rng.randrange(3, vocab) for _ in range(point.prompt_tokens)]
        self._first_token_us(adapter, prompt)  # brings the adapter onto the device
        warm = self._first_token_us(adapter, prompt)
        self.engine.residency.demote(adapter, point.level)
        return warm, self._first_token_us(adapter, prompt)

    def _first_token_us(self, adapter: str, prompt: list[int]) -> float:
        """Submit one request and step the engine until its first token; the elapsed us."""
        self._serial += 1
        rid = f"cold-{self._serial}"
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        self.engine.add_request(EngineRequest(rid, prompt, adapter, params))
        while True:
            outputs = [o for o in self.engine.step() if o.request_id == rid]
            if outputs and outputs[-1].finished:
                break
            if time.perf_counter() - start > FIRST_TOKEN_TIMEOUT_S:
                self.engine.abort(rid)
                self.engine.step()
                raise ProfileError(f"cold-start request for {adapter} had no first token after "
                                   f"{FIRST_TOKEN_TIMEOUT_S:g} s")
            if self.engine.idle:
                self.engine.wait_for_work(IDLE_WAIT_S)
        elapsed_us = (time.perf_counter() - start) * 1e6
        if outputs[-1].finish_reason == "error":
            raise ProfileError(f"cold-start request for {adapter} failed: {outputs[-1].error}")
        return elapsed_us


def _sample(point: ColdPoint, adapter: str, latency_us: float) -> dict:
    return {"phase": f"cold_{point.level}", "ranks": [point.rank], "tokens": [point.prompt_tokens],
            "adapters": [adapter], "latency_us": latency_us}


def prompt_lengths(prompt_min: int, prompt_max: int) -> tuple[int, ...]:
    """Three prompt lengths spanning the profile's range (fewer when it is narrow)."""
    return tuple(sorted({prompt_min, (prompt_min + prompt_max) // 2, prompt_max}))


def link_label(engine: LLMEngine) -> str:
    """How adapters reached the device while profiling, for the profile's ``cold_start_link``."""
    report = engine.residency.report()
    if report.link_emulated:
        bandwidth = f"{report.link_gbps:g} GB/s" if report.link_gbps else "unlimited bandwidth"
        return f"EMULATED link: {bandwidth}, {report.link_latency_ms:g} ms per load"
    if engine.model.device.type == "cuda":
        return "cuda host-to-device copy"
    return "cpu memory copy (no link; not emulated)"
