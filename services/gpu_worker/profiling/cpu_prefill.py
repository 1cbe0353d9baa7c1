"""Measures c, the tokens one CPU core handles within the device's per-layer prefill time.

CPU-assisted prefill gives a cold request's prefill ``ceil(tokens / c)`` CPU workers, so that
the LoRA deltas of a layer are ready about when the device has run that layer's base GEMMs
(the paper's profiling-guided parallelisation). ``caraserve profile --cpu-prefill`` stores the
result in the profile's ``cpu_prefill`` section, where the gpu_worker's residency factory
reads ``tokens_per_core``.

Two timings, each the median of ``repeats`` after a warm-up:

- the device: a real base-model prefill of ``tokens`` tokens on an :class:`LLMEngine`
  (timed by the profiler's own step timing), divided by the number of layers. The step
  also runs the embedding, LM head and sampling, so the per-layer time is a little high;
  the paper's split has the same slack.
- one core: with torch at one thread, the deltas ``(x @ A) @ B`` in the model dtype of all
  seven projections of one layer at ``rank`` for ``tokens`` tokens: what one CPU prefill
  worker (single-threaded plain torch) computes per layer.

Then ``c = max(1, floor(tokens * layer_ms / core_ms))``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from services.gpu_worker.engine import DTYPES, LLMEngine
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.profiling.config import ProfileConfig
from services.gpu_worker.profiling.profiler import GridPoint, Profiler
from shared.llama_shape import PROJECTIONS, LlamaShape
from shared.perf_model import CpuPrefillProfile, ProfileError, current_device_name

__all__ = ["CpuPrefillProfile", "measure_tokens_per_core", "device_layer_ms", "core_ms"]

Progress = Callable[[str, int, int], None]  # (stage, done, total), as the profiler reports
STAGE = "cpu prefill"
DEFAULT_REPEATS = 5


def measure_tokens_per_core(model_dir: str | Path, engine_config: EngineConfig, rank: int = 64, tokens: int = 256,
                            repeats: int = DEFAULT_REPEATS,
                            progress: Progress = lambda stage, done, total: None) -> CpuPrefillProfile:
    """c for this model on this device and CPU, at ``rank`` and a prefill of ``tokens`` tokens."""
    if rank < 1 or tokens < 1 or repeats < 1:
        raise ProfileError(f"cpu prefill profiling needs rank, tokens and repeats >= 1, got {rank}, {tokens}, "
                           f"{repeats}")
    if tokens > engine_config.max_batched_tokens:
        raise ProfileError(f"a prefill of {tokens} tokens does not fit one step of max_batched_tokens "
                           f"{engine_config.max_batched_tokens}")
    shape = LlamaShape.from_model_dir(model_dir)
    total = 2 * repeats
    layer_ms = device_layer_ms(model_dir, engine_config, tokens, repeats,
                               lambda done: progress(STAGE, done, total))
    one_core_ms = core_ms(shape, DTYPES[engine_config.dtype], rank, tokens, repeats,
                          lambda done: progress(STAGE, repeats + done, total))
    c = max(1, math.floor(tokens * layer_ms / one_core_ms))
    device = engine_config.resolved_device()
    return CpuPrefillProfile(tokens_per_core=c, rank=rank, tokens=tokens, layer_ms=layer_ms, core_ms=one_core_ms,
                             device_name=current_device_name(device))


def device_layer_ms(model_dir: str | Path, engine_config: EngineConfig, tokens: int, repeats: int,
                    done: Callable[[int], None] = lambda n: None) -> float:
    """Median prefill time of ``tokens`` base-model tokens per decoder layer on the engine's device (ms)."""
    config = ProfileConfig(batch_sizes=(1,), decode_steps=1, repeats=repeats, prompt_min=tokens, prompt_max=tokens,
                           cold_start=False)
    engine = LLMEngine(model_dir, engine_config)
    try:
        profiler = Profiler(engine, config, adapters_by_rank={})
        base = GridPoint(batch=1, ranks=[0])
        profiler._measure(base, -1)  # warm-up
        times_us = []
        for i in range(repeats):
            times_us.append(_prefill_us(profiler._measure(base, 0)))
            done(i + 1)
        layers = engine.model.config.shape.num_layers
    finally:
        engine.close()
    return statistics.median(times_us) / 1e3 / layers


def _prefill_us(samples: list[dict]) -> float:
    """The time of a pass's one prefill step (the whole prompt at once: it fits max_batched_tokens)."""
    prefill = [s for s in samples if s["phase"] == "prefill"]
    if len(prefill) != 1:
        raise ProfileError(f"expected the prompt to prefill in one step, the engine took {len(prefill)}")
    return float(prefill[0]["latency_us"])


def core_ms(shape: LlamaShape, dtype: torch.dtype, rank: int, tokens: int, repeats: int,
            done: Callable[[int], None] = lambda n: None) -> float:
    """Median time of one CPU thread computing one layer's LoRA deltas of ``tokens`` tokens (ms)."""
    gen = torch.Generator().manual_seed(0)
    operands = []
    for proj in PROJECTIONS:
        d_in, d_out = shape.proj_dims(proj)
        operands.append((torch.randn(tokens, d_in, generator=gen).to(dtype),
                         torch.randn(d_in, rank, generator=gen).to(dtype) / math.sqrt(d_in),
                         torch.randn(rank, d_out, generator=gen).to(dtype) / math.sqrt(rank)))
    with one_thread():
        _layer_deltas(operands)  # warm-up
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            _layer_deltas(operands)
            times.append(time.perf_counter() - start)
            done(i + 1)
    return statistics.median(times) * 1e3


def _layer_deltas(operands: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [(x @ a) @ b for x, a, b in operands]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (a CPU prefill worker's setting), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
