"""Profiles the engine's real prefill and decode steps and fits the performance model.

For each point of a grid (batch size x rank mix) the profiler submits a batch of
requests with random prompt lengths, lets the engine prefill them (each prefill step is a
``prefill`` sample) and then times a few decode steps over the whole batch (``decode``
samples, their median).

Timing noise on a shared host is one-sided (other work only ever slows a step down) and
comes in bursts of seconds. So the whole grid is measured ``repeats`` times, each pass in
its own shuffled order, with the same prompts for a point in every pass; a point's sample
is its fastest pass (the minimum over passes of each step's time). Rank mixes are homogeneous (every request at rank r), heterogeneous (ranks
drawn from the rank list) and base-only (rank 0, the no-LoRA reference the SLO derives
from). Adapters are synthetic PEFT directories on the profiled model (16 per rank).
Cold starts are profiled after the grid, on a second engine in on_demand residency
mode (``cold_start_profiler.py``). The samples are fitted by
:class:`shared.perf_model.PerfModel` and saved as a ``caraserve.profile/1`` JSON.
"""

from __future__ import annotations

import hashlib
import logging
import random
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from services.gpu_worker.profiling.cold_start import ColdStartProfiler, link_label, prompt_lengths
from services.gpu_worker.engine import LLMEngine
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.profiling.config import ProfileConfig
from services.gpu_worker.profiling.profile_cache import model_digest
from services.gpu_worker.request import EngineRequest, SamplingParams
from services.gpu_worker.residency.config import ResidencyConfig
from shared.llama_shape import LlamaShape
from shared.model_store import cache_root
from shared.perf_model import PerfModel, ProfileInfo, current_device_name
from shared.synthetic_adapters import write_adapter

log = logging.getLogger(__name__)

ADAPTERS_PER_RANK = 16


@dataclass
class GridPoint:
    batch: int
    ranks: list[int]  # one per request; 0 = base model


@dataclass
class Profiler:
    engine: LLMEngine
    config: ProfileConfig
    adapters_by_rank: dict[int, list[str]]
    progress: Callable[[int, int], None] = lambda done, total: None
    samples: list[dict] = field(default_factory=list)
    _serial: int = 0

    def grid(self) -> list[GridPoint]:
        rng = random.Random(self.config.seed)
        points = []
        for batch in self.config.batch_sizes:
            points.append(GridPoint(batch, [0] * batch))
            points += [GridPoint(batch, [r] * batch) for r in self.config.ranks]
            points += [GridPoint(batch, [rng.choice(self.config.ranks) for _ in range(batch)])
                       for _ in range(self.config.mixed_draws)]
        return points

    def run(self) -> list[dict]:
        """The samples of the engine's current kernel family."""
        self.samples = self.run_families((self.engine.backend,))[self.engine.backend]
        return self.samples

    def run_families(self, backends: tuple[str, ...]) -> dict[str, list[dict]]:
        """The samples of each kernel family in ``backends``. Each grid point is measured with
        every family back to back, so a burst of load on the host slows them alike and the
        comparison between families (backend ``auto``) stays fair."""
        points = self.grid()
        warm = min(4, max(self.config.batch_sizes))  # the engine holds at most the largest batch
        passes = {b: [[] for _ in points] for b in backends}  # family -> point -> pass -> samples
        for backend in backends:
            self.engine.set_backend(backend)
            self._measure(GridPoint(warm, [self.config.ranks[-1]] * warm), -1)  # warm-up
        order = random.Random(self.config.seed + 1)
        done, total = 0, len(points) * self.config.repeats
        for _ in range(self.config.repeats):
            for i in order.sample(range(len(points)), len(points)):
                for backend in backends:
                    self.engine.set_backend(backend)
                    passes[backend][i].append(self._measure(points[i], i))
                done += 1
                self.progress(done, total)
        return {b: [sample for runs in by_point for sample in fastest(runs)] for b, by_point in passes.items()}

    def _measure(self, point: GridPoint, index: int) -> list[dict]:
        """One pass over ``point``: its prefill samples in step order, then its decode sample.

        The prompts depend only on the point's ``index``, so every pass prefills the same steps.
        """
        rng = random.Random(self.config.seed * 7919 + index)
        ids = []
        for i, rank in enumerate(point.ranks):
            self._serial += 1
            rid = f"profile-{self._serial}"
            adapter = self.adapters_by_rank[rank][i % ADAPTERS_PER_RANK] if rank else None
            vocab = self.engine.model.config.vocab_size
            length = rng.randint(self.config.prompt_min, self.config.prompt_max)
            prompt = [rng.randrange(3, vocab) for _ in range(length)]
            params = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
            self.engine.add_request(EngineRequest(rid, prompt, adapter, params))
            ids.append(rid)
        samples = self._run_until_all_decode(point.batch)
        samples.append(self._decode_sample())
        for rid in ids:
            self.engine.abort(rid)
        while self.engine.has_unfinished():
            self.engine.step()
        return samples

    def _run_until_all_decode(self, batch: int) -> list[dict]:
        """Step until the whole batch decodes; the pure prefill steps' samples."""
        samples: list[dict] = []
        while len(self.engine.admission.running) < batch or self.engine.admission.waiting:
            self._timed_step(samples)
        self._timed_step(samples)  # the last prefill's sequences produced their first token; next is decode
        return samples

    def _timed_step(self, samples: list[dict]) -> float:
        """One engine step; a pure prefill step is appended to ``samples``. Returns its µs."""
        start = time.perf_counter()
        self.engine.step()
        elapsed_us = (time.perf_counter() - start) * 1e6
        plan = self.engine.last_plan
        if plan and plan.prefill and not plan.decode:
            samples.append(_sample("prefill", plan.prefill, elapsed_us))
        return elapsed_us

    def _decode_sample(self) -> dict:
        """Time ``decode_steps`` decode steps of the whole batch; their median is one sample
        (context lengths grow by one token per step, so the middle step's are recorded)."""
        times, sample = [], None
        for i in range(self.config.decode_steps):
            times.append(self._timed_step([]))
            if i == self.config.decode_steps // 2:
                sample = _sample("decode", self.engine.last_plan.decode, 0.0)
        assert sample is not None
        sample["latency_us"] = statistics.median(times)
        return sample


def fastest(runs: list[list[dict]]) -> list[dict]:
    """One point's samples from its passes: each sample at its fastest pass.

    Passes are expected to step identically; a pass whose steps differ from the first's
    (same phase, ranks and tokens in the same order) is left out of the minimum.
    """
    first = runs[0]
    same = [run for run in runs if [_shape(s) for s in run] == [_shape(s) for s in first]]
    return [{**sample, "latency_us": min(run[i]["latency_us"] for run in same)} for i, sample in enumerate(first)]


def _shape(sample: dict) -> tuple:
    return sample["phase"], tuple(sample["ranks"]), tuple(sample["tokens"])


def _sample(phase: str, seqs: list, latency_us: float) -> dict:
    return {"phase": phase, "ranks": [s.rank for s in seqs], "tokens": [s.num_tokens for s in seqs],
            "adapters": [s.adapter for s in seqs], "latency_us": latency_us}


def ensure_adapters(model_dir: Path, ranks: tuple[int, ...], targets: tuple[str, ...]) -> dict[int, dict[str, Path]]:
    """Synthetic adapters for profiling: ADAPTERS_PER_RANK per rank, written once into the cache."""
    shape = LlamaShape.from_model_dir(model_dir)
    key = hashlib.sha1(f"{Path(model_dir).resolve()}|{'.'.join(targets)}".encode()).hexdigest()[:10]
    root = cache_root() / "profile-adapters" / key
    out: dict[int, dict[str, Path]] = {}
    for rank in ranks:
        out[rank] = {}
        for i in range(ADAPTERS_PER_RANK):
            name = f"profile-r{rank}-{i}"
            path = root / name
            if not (path / "adapter_model.safetensors").is_file():
                write_adapter(path, shape, rank, targets, seed=rank * 1000 + i, base_model=Path(model_dir).name)
            out[rank][name] = path
    return out


def profiling_adapters(model_dir: Path, config: ProfileConfig) -> tuple[dict[str, Path], dict[int, list[str]]]:
    """(adapter paths by name, adapter names by rank) of the synthetic profiling adapters."""
    adapters = ensure_adapters(model_dir, config.ranks, config.targets)
    paths = {name: path for by_name in adapters.values() for name, path in by_name.items()}
    return paths, {rank: list(names) for rank, names in adapters.items()}


Progress = Callable[[str, int, int], None]  # (stage, done, total)


def profile(model_dir: Path, engine_config: EngineConfig, config: ProfileConfig,
            progress: Progress = lambda stage, done, total: None, grid: str = "full") -> PerfModel:
    """Profile ``engine_config``'s kernel family on this device and fit the performance model.

    Stages reported to ``progress``: "steps" (the decode/prefill grid), then "cold starts"
    unless ``config.cold_start`` is off.
    """
    backend = engine_config.starting_backend()
    return profile_backends(model_dir, engine_config, config, (backend,), progress, grid)[backend]


def profile_backends(model_dir: Path, engine_config: EngineConfig, config: ProfileConfig, backends: tuple[str, ...],
                     progress: Progress = lambda stage, done, total: None, grid: str = "full") -> dict[str, PerfModel]:
    """One fitted profile per kernel family in ``backends``.

    The step grid runs on one engine, each point with every family back to back (switching
    with ``set_backend``; stage "bgmv and mbgmv steps" when there are several); the cold
    starts run once and go into every profile (a load does not depend on the family).
    """
    paths, by_rank = profiling_adapters(model_dir, config)
    engine = LLMEngine(model_dir, engine_config, paths)
    stage = "steps" if len(backends) == 1 else f"{' and '.join(backends)} steps"
    steps = Profiler(engine, config, by_rank, lambda d, t: progress(stage, d, t)).run_families(backends)
    del engine
    cold, link = [], ""
    if config.cold_start:
        cold, link = measure_cold_starts(model_dir, engine_config, config, paths, by_rank, progress)
    device = engine_config.resolved_device()
    models = {}
    for backend in backends:
        info = ProfileInfo(backend=backend, device=device, device_name=current_device_name(device),
                           model=Path(model_dir).name, model_digest=model_digest(model_dir),
                           dtype=engine_config.dtype, cold_start_link=link, grid=grid)
        models[backend] = PerfModel.fit(steps[backend] + cold, info, holdout_fraction=config.holdout_fraction,
                                        seed=config.seed)
    return models


def measure_cold_starts(model_dir: Path, engine_config: EngineConfig, config: ProfileConfig,
                        paths: dict[str, Path], by_rank: dict[int, list[str]],
                        progress: Progress = lambda stage, done, total: None) -> tuple[list[dict], str]:
    """(cold_host and cold_disk samples, the link label) from an on_demand engine."""
    residency = ResidencyConfig(cold_start="on_demand", emulate_link_gbps=config.emulate_link_gbps,
                                emulate_link_latency_ms=config.emulate_link_latency_ms)
    engine = LLMEngine(model_dir, engine_config, paths, residency=residency)
    try:
        cold = ColdStartProfiler(engine, by_rank, prompt_lengths(config.prompt_min, config.prompt_max),
                                 config.repeats, config.seed, lambda d, t: progress("cold starts", d, t))
        return cold.run(), link_label(engine)
    finally:
        engine.close()


def add_cold_starts(existing: PerfModel, model_dir: Path, engine_config: EngineConfig, config: ProfileConfig,
                    progress: Progress = lambda stage, done, total: None) -> PerfModel:
    """``existing`` with its cold-start samples measured anew here; its decode and prefill
    samples are kept, so their fits do not change.

    Raises ProfileMismatchError unless ``existing`` was made for this model, device and backend.
    """
    device = engine_config.resolved_device()
    existing.check(expect_model_digest=model_digest(model_dir), expect_device=current_device_name(device),
                   expect_backend=engine_config.starting_backend())
    paths, by_rank = profiling_adapters(model_dir, config)
    cold, link = measure_cold_starts(model_dir, engine_config, config, paths, by_rank, progress)
    kept = [s for s in existing.samples if not str(s.get("phase", "")).startswith("cold_")]
    info = replace(existing.info, cold_start_link=link)
    return PerfModel.fit(kept + cold, info, holdout_fraction=config.holdout_fraction, seed=config.seed)
