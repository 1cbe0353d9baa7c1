"""A real CpuPool of two processes on a real ring: every input group against the plain-torch reference,
uneven and rotated token splits, mixed ranks and target sets, a missing adapter segment, the
ring's owner dying, and a clean close."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from tests.unit.cpu_prefill.slice_reference import reference as slice_reference

from services.cpu_prefill.pool import STOP_GRACE_S, CpuPool
from shared.llama_shape import INPUT_GROUPS, LlamaShape
from shared.shm_exchange import (GROUP_IDS, AdapterSegment, ExchangeRing, RingGeometry, remove_stale_segments,
                                 segment_prefix)

pytestmark = pytest.mark.timeout(420)

SHAPE = LlamaShape(num_layers=2, hidden_size=16, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = {0: (ALL, 4), 1: (("q_proj", "o_proj", "up_proj"), 1)}  # layer: (projections, rank)


def adapter_weights(dtype: torch.dtype) -> dict:
    gen = torch.Generator().manual_seed(7)
    weights = {}
    for layer, (projs, rank) in TARGETS.items():
        for proj in projs:
            d_in, d_out = SHAPE.proj_dims(proj)
            weights[(layer, proj)] = (torch.randn(d_in, rank, generator=gen).to(dtype),
                                      torch.randn(rank, d_out, generator=gen).to(dtype))
    return weights


def reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The delta as the CPU device path rounds a segment of ``x``'s length (see lora_slice)."""
    return slice_reference(x, a, b, x.shape[0])


def shm_names(worker_id: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"caraserve-{worker_id}-")]


def wait_for(predicate, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def post(ring: ExchangeRing, slot: int, layer: int, group: str, adapter_id: int, x: torch.Tensor, parts: int,
         first: int) -> int:
    ring.input_view(slot, group, x.shape[0]).copy_(x)
    for proj in INPUT_GROUPS[group]:
        ring.output_view(slot, proj, x.shape[0]).fill_(float("nan"))
    return ring.post(slot, layer, group, adapter_id, x.shape[0], parts, first)


def test_two_processes_compute_every_group_and_skip_a_missing_adapter():
    worker_id = f"p{uuid.uuid4().hex[:8]}"
    ring = ExchangeRing.create(segment_prefix(worker_id), RingGeometry(SHAPE, "bfloat16", 16, 2, 2))
    weights = adapter_weights(torch.bfloat16)
    segment = AdapterSegment.create(ring.prefix, 1, weights)
    pool = CpuPool(ring.name, 2)
    gen = torch.Generator().manual_seed(3)
    try:
        pool.start()
        wait_for(lambda: pool.alive() == 2)
        assert pool.owner_alive()
        for layer in TARGETS:
            for i, group in enumerate(GROUP_IDS):
                jobs = []  # two slots posted before one doorbell: the processes scan every slot
                for slot, (tokens, parts, first) in enumerate(((7, 2, (layer + i) % 2), (1, 1, 1))):
                    x = torch.randn(tokens, ring.geometry.in_features(group), generator=gen).to(torch.bfloat16)
                    jobs.append((slot, x, post(ring, slot, layer, group, 1, x, parts, first), parts, first))
                ring.ring_doorbell()
                for slot, x, seq, parts, first in jobs:
                    assert ring.wait_done(slot, seq, parts, first, time.monotonic() + 10), (layer, group, slot)
                    for proj in INPUT_GROUPS[group]:
                        out = ring.output_view(slot, proj, x.shape[0])
                        if (layer, proj) in weights:
                            want = reference(x, *weights[(layer, proj)])
                            assert torch.allclose(out, want, rtol=1e-4, atol=1e-4), (layer, proj, slot)
                        else:  # a projection the adapter lacks at this layer is not written
                            assert out.isnan().all(), (layer, proj, slot)
        x = torch.randn(5, 16, generator=gen).to(torch.bfloat16)
        seq = post(ring, 0, 0, "qkv", 9, x, 2, 0)  # adapter 9 has no segment: no acknowledgement
        ring.ring_doorbell()
        assert not ring.wait_done(0, seq, 2, 0, time.monotonic() + 0.5)
        seq = post(ring, 0, 0, "qkv", 1, x, 2, 0)  # and the processes still serve the next job
        ring.ring_doorbell()
        assert ring.wait_done(0, seq, 2, 0, time.monotonic() + 10)
        assert torch.allclose(ring.output_view(0, "k_proj", 5), reference(x, *weights[(0, "k_proj")]),
                              rtol=1e-4, atol=1e-4)
        pids = pool.pids()
        started = time.monotonic()
        pool.close()
        assert time.monotonic() - started < STOP_GRACE_S  # SIGTERM was enough: no SIGKILL fallback
    finally:
        pool.close()
        segment.close()
        ring.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not shm_names(worker_id)


OWNER = """
import sys, time
from shared.llama_shape import LlamaShape
from shared.shm_exchange import ExchangeRing, RingGeometry, segment_prefix
shape = LlamaShape(num_layers=2, hidden_size=16, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4)
ring = ExchangeRing.create(segment_prefix(sys.argv[1]), RingGeometry(shape, "float32", 4, 1, 2))
print(ring.name, flush=True)
time.sleep(120)
"""


def test_the_processes_stop_when_the_rings_owner_is_killed():
    worker_id = f"p{uuid.uuid4().hex[:8]}"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    owner = subprocess.Popen([sys.executable, "-c", OWNER, worker_id], stdout=subprocess.PIPE, text=True, cwd=root)
    pool = None
    try:
        name = owner.stdout.readline().strip()
        pool = CpuPool(name, 2)
        pool.start()
        wait_for(lambda: pool.alive() == 2)
        assert pool.owner_alive()
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        wait_for(lambda: pool.alive() == 0, timeout_s=10)  # each exited on its own at its next wake-up
        assert not pool.owner_alive()
    finally:
        if pool is not None:
            pool.close()
        owner.kill()
        owner.wait()
    assert remove_stale_segments(worker_id) == [name]  # the killed owner's ring, left for its successor
    assert not shm_names(worker_id)
