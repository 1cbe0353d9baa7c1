"""The shared-memory exchange on its own: layout, views across processes, seq/acks, waiting, lifetime."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from shared.llama_shape import LlamaShape
from shared.shm_exchange import (AdapterSegment, ExchangeRing, RingGeometry, RingMismatchError, remove_stale_segments,
                                 segment_prefix, token_slice)

REPO = Path(__file__).resolve().parents[2]
SHAPE = LlamaShape(num_layers=2, hidden_size=16, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4)


@pytest.fixture
def worker_id() -> str:
    return f"x{uuid.uuid4().hex[:8]}"


def names(worker_id: str) -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"caraserve-{worker_id}-")}


def make_ring(worker_id: str, workers: int = 2, dtype: str = "float32") -> ExchangeRing:
    return ExchangeRing.create(segment_prefix(worker_id), RingGeometry(SHAPE, dtype, 8, 2, workers))


def run_child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_token_slices_cover_every_row_once():
    for tokens in (1, 5, 64, 257):
        for parts in range(1, 6):
            rows = [r for j in range(parts) for r in range(*token_slice(tokens, parts, j))]
            assert rows == list(range(tokens))


def test_views_are_shared_with_another_process_and_acks_carry_the_seq(worker_id):
    ring = make_ring(worker_id)
    try:
        x = torch.arange(5 * 16, dtype=torch.float32).view(5, 16)
        ring.input_view(1, "qkv", 5).copy_(x)
        seq = ring.post(1, 1, "qkv", 7, 5, 2, 1)
        child = run_child(f"""
from shared.shm_exchange import ExchangeRing
r = ExchangeRing.attach({ring.name!r})
job = r.job(1)
assert (job.seq, job.layer, job.group, job.adapter_id, job.tokens) == ({seq}, 1, "qkv", 7, 5), job
for w in (0, 1):
    s, e = r.assigned(job, w)
    r.output_view(1, "k_proj", job.tokens)[s:e] = r.input_view(1, "qkv", job.tokens)[s:e, :8] * 2
    r.ack(1, w, job.seq)
r.close()
""")
        assert child.returncode == 0, child.stderr
        assert ring.wait_done(1, seq, 2, 1, time.monotonic() + 1)
        assert torch.equal(ring.output_view(1, "k_proj", 5), x[:, :8] * 2)
        assert names(worker_id) == {ring.name.split("/")[-1]}  # the attaching process did not unlink it
        # a new job: the old acks no longer count
        seq2 = ring.post(1, 0, "o", 7, 3, 2, 0)
        assert seq2 != seq and not ring.wait_done(1, seq2, 2, 0, time.monotonic() + 0.05)
    finally:
        ring.close()
    assert not names(worker_id)


def test_a_missing_worker_means_false_at_the_deadline_not_a_hang(worker_id):
    ring = make_ring(worker_id)
    try:
        seq = ring.post(0, 0, "down", 1, 4, 2, 0)
        start = time.monotonic()
        assert not ring.wait_done(0, seq, 2, 0, start + 0.2)
        assert 0.2 <= time.monotonic() - start < 1.0
    finally:
        ring.close()


def test_waiting_for_the_doorbell_takes_no_cpu(worker_id):
    ring = make_ring(worker_id)
    try:
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        assert ring.wait_doorbell(ring.doorbell(), spin_s=0.001, block_s=0.3) == ring.doorbell()
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        assert time.monotonic() - start >= 0.25 and cpu < 0.05
    finally:
        ring.close()


def test_a_bad_segment_or_version_is_refused(worker_id):
    path = Path("/dev/shm") / f"caraserve-{worker_id}-1-ring"
    path.write_bytes(b"\0" * 4096)
    try:
        with pytest.raises(RingMismatchError, match="not a version-1"):
            ExchangeRing.attach(path.name)
    finally:
        path.unlink()
    with pytest.raises(FileNotFoundError):
        ExchangeRing.attach(f"caraserve-{worker_id}-1-ring")


def test_stale_segments_of_dead_owners_are_removed_and_others_kept(worker_id):
    dead = run_child("import os; print(os.getpid())")
    dead_pid = int(dead.stdout)
    stale = Path("/dev/shm") / f"caraserve-{worker_id}-{dead_pid}-ring"
    other = Path("/dev/shm") / f"caraserve-{worker_id}-2-{dead_pid}-ring"  # worker id "<id>-2"
    stale.write_bytes(b"x")
    other.write_bytes(b"x")
    live = make_ring(worker_id)
    try:
        assert remove_stale_segments(worker_id) == [stale.name]
        assert not stale.exists() and other.exists() and live.name in os.listdir("/dev/shm")
    finally:
        live.close()
        other.unlink()


def test_a_killed_owner_leaves_a_segment_that_the_next_start_removes(worker_id):
    child = run_child(f"""
import os, signal
from shared.llama_shape import LlamaShape
from shared.shm_exchange import ExchangeRing, RingGeometry, segment_prefix
ExchangeRing.create(segment_prefix({worker_id!r}), RingGeometry(LlamaShape(2, 16, 32, 4, 2, 4), "float32", 8, 2, 1))
os.kill(os.getpid(), signal.SIGKILL)
""")
    assert child.returncode == -signal.SIGKILL
    assert names(worker_id)
    remove_stale_segments(worker_id)
    assert not names(worker_id)


def test_adapter_segments_round_trip_in_another_process(worker_id):
    gen = torch.Generator().manual_seed(0)
    weights = {(0, "q_proj"): (torch.randn(16, 3, generator=gen), torch.randn(3, 16, generator=gen)),
               (1, "down_proj"): (torch.randn(32, 1, generator=gen), torch.randn(1, 16, generator=gen))}
    segment = AdapterSegment.create(segment_prefix(worker_id), 9, weights)
    try:
        assert all(torch.equal(segment.weights[k][i], weights[k][i]) for k in weights for i in (0, 1))
        child = run_child(f"""
import torch
from shared.shm_exchange import AdapterSegment
s = AdapterSegment.attach({segment.name!r})
a, b = s.weights[(1, "down_proj")]
print(s.adapter_id, tuple(a.shape), tuple(b.shape), float(a.sum()), float(b.sum()))
s.close()
""")
        assert child.returncode == 0, child.stderr
        adapter_id, *rest = child.stdout.split()
        a, b = weights[(1, "down_proj")]
        assert int(adapter_id) == 9 and rest[:4] == ["(32,", "1)", "(1,", "16)"]
        assert abs(float(rest[4]) - float(a.sum())) < 1e-4 and abs(float(rest[5]) - float(b.sum())) < 1e-4
    finally:
        segment.close()
        segment.close()  # idempotent
    assert not names(worker_id)
