"""Microbench of the shared-memory exchange: one layer's q/k/v LoRA deltas through the real ring and pool.

For each prompt length and pool size (1 and 2 CPU processes) it times, from the worker side,
writing the activations, posting the job, and waiting for every process's acknowledgement
(the deltas are then in shared memory). ``compute_ms`` is the same math on one thread of
this process with no exchange, so ``exchange_overhead_ms`` = 1-process time - compute time.
``profiled_split`` is the speedup of the split the worker would choose (``ceil(L / c)``
processes, at most 2, with ``c`` the default tokens per core) over one process.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from services.cpu_prefill.lora_slice import lora_slice
from services.cpu_prefill.pool import CpuPool
from services.gpu_worker.residency.config import DEFAULT_TOKENS_PER_CORE
from shared.llama_shape import INPUT_GROUPS, LlamaShape
from shared.shm_exchange import AdapterSegment, ExchangeRing, RingGeometry, segment_prefix

PROJS = INPUT_GROUPS["qkv"]


def _weights(shape: LlamaShape, rank: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for proj in PROJS:
        width_in, width_out = shape.proj_dims(proj)
        out[(0, proj)] = (torch.randn(width_in, rank, generator=gen).to(torch.bfloat16) * 0.01,
                          torch.randn(rank, width_out, generator=gen).to(torch.bfloat16) * 0.01)
    return out


def _exchange_ms(ring: ExchangeRing, x: torch.Tensor, parts: int, repeats: int) -> float:
    tokens, times = x.shape[0], []
    for _ in range(repeats):
        start = time.perf_counter()
        ring.input_view(0, "qkv", tokens).copy_(x)
        seq = ring.post(0, 0, "qkv", 1, tokens, parts, 0)
        ring.ring_doorbell()
        if not ring.wait_done(0, seq, parts, 0, time.monotonic() + 10):
            raise RuntimeError("the pool did not answer within 10 s")
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:]) * 1e3


def _compute_ms(x: torch.Tensor, weights: dict, repeats: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    outs = {p: torch.empty(x.shape[0], weights[(0, p)][1].shape[1]) for p in PROJS}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for proj in PROJS:
            lora_slice(x, *weights[(0, proj)], outs[proj], x.shape[0])
        times.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return statistics.median(times[2:]) * 1e3


def _with_pool(shape: LlamaShape, rank: int, workers: int, lengths: tuple[int, ...], repeats: int,
               weights: dict) -> dict[int, float]:
    ring = ExchangeRing.create(segment_prefix("bench-micro"), RingGeometry(shape, "bfloat16", max(lengths), 1, workers))
    segment = AdapterSegment.create(ring.prefix, 1, weights)
    pool = CpuPool(ring.name, workers)
    try:
        pool.start()
        deadline = time.monotonic() + 300  # a fresh host builds the native kernel first
        while pool.alive() < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("the CPU pool did not start")
            time.sleep(0.05)
        gen = torch.Generator().manual_seed(1)
        return {n: _exchange_ms(ring, torch.randn(n, shape.hidden_size, generator=gen).to(torch.bfloat16),
                                workers, repeats) for n in lengths}
    finally:
        pool.close()
        segment.close()
        ring.close()


def run_microbench(shape: LlamaShape, rank: int, lengths: tuple[int, ...], repeats: int) -> dict:
    """Per prompt length: 1- and 2-process exchange times, compute time, overhead and speedups (ms)."""
    weights = _weights(shape, rank)
    one = _with_pool(shape, rank, 1, lengths, repeats, weights)
    two = _with_pool(shape, rank, 2, lengths, repeats, weights)
    gen = torch.Generator().manual_seed(1)
    rows = {}
    for n in lengths:
        compute = _compute_ms(torch.randn(n, shape.hidden_size, generator=gen).to(torch.bfloat16), weights, repeats)
        split = min(2, math.ceil(n / DEFAULT_TOKENS_PER_CORE))
        rows[str(n)] = {"one_process_ms": round(one[n], 3), "two_processes_ms": round(two[n], 3),
                        "speedup_2_vs_1": round(one[n] / two[n], 3), "compute_ms": round(compute, 3),
                        "exchange_overhead_ms": round(one[n] - compute, 3), "profiled_processes": split,
                        "profiled_split_speedup": round(one[n] / (one[n] if split == 1 else two[n]), 3)}
    return {"rank": rank, "projections": list(PROJS), "tokens_per_core": DEFAULT_TOKENS_PER_CORE,
            "repeats": repeats, "by_prompt_length": rows}
