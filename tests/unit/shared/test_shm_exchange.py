"""shared/shm_exchange.py against its contract: names, geometry, views across processes, seq and acks,
futex waits that take no CPU, refusal of foreign or truncated segments, and segment lifetime."""

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

from shared.config import ConfigError
from shared.llama_shape import LlamaShape
from shared.shm_exchange import (GROUP_IDS, GROUP_OF, INPUT_GROUPS, AdapterSegment, ExchangeRing, RingGeometry,
                                 RingMismatchError, adapter_segment_name, remove_stale_segments, ring_name,
                                 segment_prefix, token_slice)

REPO = Path(__file__).resolve().parents[3]
SHM = Path("/dev/shm")
SHAPE = LlamaShape(num_layers=2, hidden_size=16, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4)
CHILD_HEAD = "import torch\nfrom shared.shm_exchange import ExchangeRing, AdapterSegment\n"


@pytest.fixture
def worker_id():
    """A fresh worker id; the test fails if any of its segments is left in /dev/shm."""
    wid = f"t{uuid.uuid4().hex[:8]}"
    yield wid
    assert not names(wid), "segments left behind"


def names(worker_id: str) -> set[str]:
    return {p.name for p in SHM.glob(f"caraserve-{worker_id}-*")}


def make_ring(worker_id: str, workers: int = 2, dtype: str = "float32", slots: int = 2) -> ExchangeRing:
    return ExchangeRing.create(segment_prefix(worker_id), RingGeometry(SHAPE, dtype, 8, slots, workers))


def run_child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD_HEAD + code], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


# ---- names, groups, geometry -------------------------------------------------------------
def test_names_and_groups_follow_the_contract():
    assert segment_prefix("w1", 42) == "caraserve-w1-42"
    assert segment_prefix("w1") == f"caraserve-w1-{os.getpid()}"
    assert ring_name("p") == "p-ring" and adapter_segment_name("p", 7) == "p-a7"
    assert GROUP_IDS == ("qkv", "o", "gate_up", "down")
    assert INPUT_GROUPS["gate_up"] == ("gate_proj", "up_proj") and GROUP_OF["v_proj"] == "qkv"


def test_token_slices_are_contiguous_near_equal_and_cover_every_row_once():
    for tokens in (1, 5, 64, 257):
        for parts in range(1, 7):
            slices = [token_slice(tokens, parts, j) for j in range(parts)]
            assert [r for s, e in slices for r in range(s, e)] == list(range(tokens))
            sizes = [e - s for s, e in slices]
            assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("kwargs", [dict(dtype="float16"), dict(max_tokens=0), dict(num_slots=0),
                                    dict(num_slots=257), dict(num_cpu_workers=0), dict(num_cpu_workers=257)])
def test_a_bad_geometry_is_refused(kwargs):
    fields = dict(shape=SHAPE, dtype="bfloat16", max_tokens=8, num_slots=2, num_cpu_workers=2) | kwargs
    with pytest.raises(ConfigError):
        RingGeometry(**fields)


def test_geometry_sizes_per_group_and_projection():
    g = RingGeometry(SHAPE, "bfloat16", 8, 2, 2)
    assert [g.in_features(x) for x in GROUP_IDS] == [16, 16, 16, 32]
    assert [g.out_features(p) for p in ("q_proj", "k_proj", "o_proj", "up_proj", "down_proj")] == [16, 8, 16, 32, 16]
    assert "bfloat16" in g.describe() and "\n" not in g.describe()


# ---- the ring ----------------------------------------------------------------------------
def test_views_have_the_contract_shapes_and_disjoint_output_regions(worker_id):
    ring = make_ring(worker_id, dtype="bfloat16")
    try:
        x = ring.input_view(1, "down", 5)
        assert x.shape == (5, 32) and x.dtype == torch.bfloat16
        gate, up = ring.output_view(0, "gate_proj", 3), ring.output_view(0, "up_proj", 3)
        assert gate.shape == up.shape == (3, 32) and gate.dtype == torch.float32
        assert up.data_ptr() - gate.data_ptr() == 8 * 32 * 4  # after max_tokens * out(gate_proj) floats
        assert ring.input_view(0, "qkv", 8).data_ptr() != x.data_ptr()  # one input area per slot
    finally:
        ring.close()


def test_a_job_round_trips_through_another_process_which_does_not_unlink(worker_id):
    ring = make_ring(worker_id)
    try:
        x = torch.arange(5 * 16, dtype=torch.float32).view(5, 16)
        ring.input_view(1, "gate_up", 5).copy_(x)
        seq = ring.post(1, layer=1, group="gate_up", adapter_id=7, tokens=5, parts=2, first_worker=1)
        ring.ring_doorbell()
        child = run_child(f"""
r = ExchangeRing.attach({ring.name!r})
assert r.wait_doorbell(0, spin_s=0.0, block_s=5.0) != 0 and r.owner_pid == {os.getpid()}
job = r.job(1)
assert (job.seq, job.layer, job.group, job.adapter_id, job.tokens, job.parts, job.first_worker) == \\
    ({seq}, 1, "gate_up", 7, 5, 2, 1), job
for w in (0, 1):
    s, e = r.assigned(job, w)
    x = r.input_view(1, job.group, job.tokens)[s:e]
    r.output_view(1, "gate_proj", job.tokens)[s:e] = x.repeat(1, 2) * 2
    r.output_view(1, "up_proj", job.tokens)[s:e] = x.repeat(1, 2) * 3
    r.ack(1, w, job.seq)
""")  # exits without close(): an attaching process never unlinks
        assert child.returncode == 0, child.stderr
        assert ring.wait_done(1, seq, 2, 1, time.monotonic() + 1)
        assert torch.equal(ring.output_view(1, "gate_proj", 5), x.repeat(1, 2) * 2)
        assert torch.equal(ring.output_view(1, "up_proj", 5), x.repeat(1, 2) * 3)
        assert names(worker_id) == {ring.name}
    finally:
        ring.close()


def test_a_stale_ack_never_passes_for_a_new_seq_and_seq_is_never_zero(worker_id):
    ring = make_ring(worker_id, workers=3)
    try:
        ring.seq_view(0)[0] = 2 ** 31 - 1  # the last positive int32
        seq = ring.post(0, 0, "o", 1, 4, parts=2, first_worker=2)
        assert seq == 1 and ring.job(0).seq == 1
        for w in (2, 0):
            ring.ack(0, w, seq)
        assert ring.wait_done(0, seq, 2, 2, time.monotonic() + 0.1)
        seq2 = ring.post(0, 1, "o", 1, 4, parts=2, first_worker=2)
        assert seq2 == 2
        ring.ack(0, 2, seq2)
        ring.ack(0, 1, seq2)  # worker 1 is not one of this job's parts
        assert not ring.wait_done(0, seq2, 2, 2, time.monotonic() + 0.05)
    finally:
        ring.close()


def test_assigned_wraps_around_the_workers(worker_id):
    ring = make_ring(worker_id, workers=3, slots=1)
    try:
        seq = ring.post(0, 0, "qkv", 1, tokens=7, parts=2, first_worker=2)
        job = ring.job(0)
        assert job.seq == seq
        assert [ring.assigned(job, w) for w in range(3)] == [(3, 7), None, (0, 3)]
    finally:
        ring.close()


def test_wait_done_without_a_worker_returns_false_at_the_deadline_and_sleeps(worker_id):
    ring = make_ring(worker_id)
    try:
        seq = ring.post(0, 0, "down", 1, 4, 2, 0)
        start, cpu = time.monotonic(), cpu_seconds()
        assert not ring.wait_done(0, seq, 2, 0, start + 0.3)
        assert 0.3 <= time.monotonic() - start < 1.0 and cpu_seconds() - cpu < 0.1
    finally:
        ring.close()


def test_waiting_for_the_doorbell_takes_no_cpu_and_returns_last_on_timeout(worker_id):
    ring = make_ring(worker_id)
    try:
        last = ring.doorbell()
        start, cpu = time.monotonic(), cpu_seconds()
        assert ring.wait_doorbell(last, spin_s=0.001, block_s=0.3) == last
        assert time.monotonic() - start >= 0.25 and cpu_seconds() - cpu < 0.05
    finally:
        ring.close()


def test_a_doorbell_rung_in_another_process_wakes_a_blocked_waiter(worker_id):
    ring = make_ring(worker_id)
    try:
        last = ring.doorbell()
        child = subprocess.Popen([sys.executable, "-c", CHILD_HEAD + f"import time\n"
                                  f"r = ExchangeRing.attach({ring.name!r})\ntime.sleep(0.2)\nr.ring_doorbell()\n"],
                                 cwd=REPO)
        start = time.monotonic()
        assert ring.wait_doorbell(last, spin_s=0.0, block_s=30.0) == last + 1
        assert time.monotonic() - start < 20 and child.wait(timeout=30) == 0
    finally:
        ring.close()


# ---- refusal -----------------------------------------------------------------------------
def test_a_foreign_truncated_or_absent_segment_is_refused(worker_id):
    path = SHM / f"caraserve-{worker_id}-1-ring"
    ring = make_ring(worker_id)
    try:
        header = (SHM / ring.name).read_bytes()[:64]
        cases = {b"\0" * 4096: "not a version-1", b"": "not a CaraServe segment",
                 header[:4] + (2).to_bytes(4, "little") + header[8:] + b"\0" * 4032: "not a version-1",
                 header + b"\0" * 4032: "smaller than its geometry"}
        for content, message in cases.items():
            path.write_bytes(content)
            with pytest.raises(RingMismatchError, match=message):
                ExchangeRing.attach(path.name)
    finally:
        ring.close()
        path.unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        ExchangeRing.attach(path.name)


def test_a_corrupt_adapter_segment_is_refused(worker_id):
    path = SHM / f"caraserve-{worker_id}-1-a3"
    header = [0x43415241, 1, 10 ** 6, 1]  # magic, version, a count far beyond the file, float32
    path.write_bytes(b"".join(w.to_bytes(8, "little") for w in header) + b"\0" * 4064)
    try:
        with pytest.raises(RingMismatchError, match="corrupt"):
            AdapterSegment.attach(path.name)
    finally:
        path.unlink()


# ---- lifetime ----------------------------------------------------------------------------
def test_close_is_idempotent_and_only_the_owner_unlinks(worker_id):
    ring = make_ring(worker_id)
    view = ring.input_view(0, "qkv", 2)  # a view handed out does not block close()
    attached = ExchangeRing.attach(ring.name)
    attached.close()
    attached.close()
    assert names(worker_id) == {ring.name}
    ring.close()
    ring.close()
    del view
    assert not names(worker_id)


def test_stale_segments_of_dead_owners_go_and_live_or_other_workers_stay(worker_id):
    dead = dead_pid()
    stale = [SHM / f"caraserve-{worker_id}-{dead}-ring", SHM / f"caraserve-{worker_id}-{dead}-a3"]
    # worker "<id>-<dead pid>": its names also start with "caraserve-<id>-<dead pid>-"
    other = SHM / f"caraserve-{worker_id}-{dead}-{dead}-ring"
    for path in (*stale, other):
        path.write_bytes(b"x")
    live = make_ring(worker_id)
    try:
        assert remove_stale_segments(worker_id) == sorted(p.name for p in stale)
        assert not any(p.exists() for p in stale) and other.exists() and (SHM / live.name).exists()
    finally:
        live.close()
        other.unlink()


def test_a_killed_owner_leaves_segments_that_the_next_start_removes(worker_id):
    child = run_child(f"""
import os, signal
from shared.llama_shape import LlamaShape
from shared.shm_exchange import RingGeometry, segment_prefix
prefix = segment_prefix({worker_id!r})
ExchangeRing.create(prefix, RingGeometry(LlamaShape(2, 16, 32, 4, 2, 4), "float32", 8, 2, 1))
AdapterSegment.create(prefix, 1, {{(0, "q_proj"): (torch.ones(16, 2), torch.ones(2, 16))}})
os.kill(os.getpid(), signal.SIGKILL)
""")
    assert child.returncode == -signal.SIGKILL
    assert len(names(worker_id)) == 2
    assert len(remove_stale_segments(worker_id)) == 2


# ---- adapter segments --------------------------------------------------------------------
ADAPTER_CODE = """
gen = torch.Generator().manual_seed(0)
weights = {(0, "q_proj"): (torch.randn(16, 3, generator=gen), torch.randn(3, 16, generator=gen)),
           (1, "down_proj"): (torch.randn(32, 1, generator=gen), torch.randn(1, 16, generator=gen))}
weights = {k: (a.to(torch.bfloat16), b.to(torch.bfloat16)) for k, (a, b) in weights.items()}
"""


def test_adapter_segments_round_trip_exactly_in_another_process(worker_id):
    scope: dict = {"torch": torch}
    exec(ADAPTER_CODE, scope)
    weights = scope["weights"]
    segment = AdapterSegment.create(segment_prefix(worker_id), 9, weights)
    try:
        assert segment.name == adapter_segment_name(segment_prefix(worker_id), 9) and segment.adapter_id == 9
        assert segment.nbytes == sum(a.numel() * 2 + b.numel() * 2 for a, b in weights.values())
        assert all(torch.equal(segment.weights[k][i], weights[k][i]) for k in weights for i in (0, 1))
        child = run_child(ADAPTER_CODE + f"""
s = AdapterSegment.attach({segment.name!r})
assert s.adapter_id == 9 and set(s.weights) == set(weights)
for key, (a, b) in weights.items():
    sa, sb = s.weights[key]
    assert sa.dtype == torch.bfloat16 and torch.equal(sa, a) and torch.equal(sb, b), key
s.close()
""")
        assert child.returncode == 0, child.stderr
        assert names(worker_id) == {segment.name}
    finally:
        segment.close()
        segment.close()
