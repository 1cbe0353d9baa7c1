"""The CPU pool on a real ring: its deltas against the plain-torch reference, restarts, cleanup; the microbench."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest
import torch

from bench.exchange_microbench import run_microbench
from services.cpu_prefill.lora_slice import lora_slice, lora_slice_reference
from services.cpu_prefill.pool import CpuPool
from shared.llama_shape import INPUT_GROUPS, LlamaShape
from shared.shm_exchange import AdapterSegment, ExchangeRing, RingGeometry, segment_prefix

SHAPE = LlamaShape(num_layers=2, hidden_size=16, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4)


def test_lora_slice_matches_the_reference():
    gen = torch.Generator().manual_seed(0)
    for rank in (1, 8):
        x, a, b = torch.randn(5, 16, generator=gen), torch.randn(16, rank, generator=gen), torch.randn(rank, 24, generator=gen)
        out = torch.empty(5, 24)
        lora_slice(x, a, b, out, 5)
        assert torch.allclose(out, lora_slice_reference(x, a, b), atol=1e-5)


def _adapter(rank: int) -> dict:
    gen = torch.Generator().manual_seed(rank)
    return {(layer, proj): (torch.randn(SHAPE.proj_dims(proj)[0], rank, generator=gen),
                            torch.randn(rank, SHAPE.proj_dims(proj)[1], generator=gen))
            for layer in range(2) for proj in ("q_proj", "v_proj", "down_proj")}


def _wait_ready(pool: CpuPool, workers: int) -> None:
    deadline = time.monotonic() + 300  # a fresh host builds the native kernel first
    while pool.alive() < workers:
        assert time.monotonic() < deadline, "the pool did not start"
        time.sleep(0.05)


def _exchange(ring: ExchangeRing, layer: int, group: str, x: torch.Tensor, parts: int, deadline_s: float = 10.0):
    ring.input_view(0, group, x.shape[0]).copy_(x)
    seq = ring.post(0, layer, group, 1, x.shape[0], parts, 0)
    ring.ring_doorbell()
    return ring.wait_done(0, seq, parts, 0, time.monotonic() + deadline_s)


@pytest.mark.timeout(420)
def test_a_pool_computes_every_group_and_survives_a_sigkill():
    worker_id = f"p{uuid.uuid4().hex[:8]}"
    ring = ExchangeRing.create(segment_prefix(worker_id), RingGeometry(SHAPE, "float32", 16, 1, 2))
    weights = _adapter(rank=1)
    segment = AdapterSegment.create(ring.prefix, 1, weights)
    pool = CpuPool(ring.name, 2)
    try:
        pool.start()
        _wait_ready(pool, 2)
        gen = torch.Generator().manual_seed(3)
        for layer, group, tokens in ((0, "qkv", 7), (1, "down", 5), (1, "qkv", 1)):
            x = torch.randn(tokens, ring.geometry.in_features(group), generator=gen)
            assert _exchange(ring, layer, group, x, parts=2 if tokens > 1 else 1)
            for proj in INPUT_GROUPS[group]:
                if (layer, proj) in weights:
                    want = lora_slice_reference(x, *weights[(layer, proj)])
                    assert torch.allclose(ring.output_view(0, proj, tokens), want, atol=1e-5), (layer, proj)
        os.kill(pool.pids()[1], signal.SIGKILL)
        time.sleep(0.2)
        x = torch.randn(6, 16, generator=gen)
        assert not _exchange(ring, 0, "qkv", x, parts=2, deadline_s=0.3)  # its slice never comes
        assert pool.restart_dead() == [1]
        _wait_ready(pool, 2)
        assert _exchange(ring, 0, "qkv", x, parts=2)
        assert torch.allclose(ring.output_view(0, "q_proj", 6), lora_slice_reference(x, *weights[(0, "q_proj")]),
                              atol=1e-5)
        pids = pool.pids()
    finally:
        pool.close()
        segment.close()
        ring.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"caraserve-{worker_id}-")]


@pytest.mark.timeout(420)
def test_the_exchange_microbench_reports_both_pool_sizes():
    report = run_microbench(SHAPE, rank=4, lengths=(8, 32), repeats=4)
    for row in report["by_prompt_length"].values():
        assert row["one_process_ms"] > 0 and row["two_processes_ms"] > 0 and row["compute_ms"] > 0
        assert row["speedup_2_vs_1"] == pytest.approx(row["one_process_ms"] / row["two_processes_ms"], rel=1e-2)
