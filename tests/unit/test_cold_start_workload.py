"""The cold-start benchmark's workload: MAF trace parsing, popularity, rescaling, seeded requests."""

from __future__ import annotations

import numpy as np
import pytest

from bench.cold_start.workload import (POPULARITY_FILE, TRACE_FILE, WorkloadError, build_workload, load_popularity,
                                       load_trace, time_scale)
from bench.paths import MAF_DIR


def test_real_trace_and_popularity_load():
    times = load_trace(MAF_DIR / TRACE_FILE)
    pop = load_popularity(MAF_DIR / POPULARITY_FILE, 512)
    assert times.size == 2231 and np.all(np.diff(times) >= 0)
    assert pop.shape == (512,) and pop.sum() == pytest.approx(1.0)


def test_malformed_inputs(tmp_path):
    (tmp_path / "t.txt").write_text("header\n==========\n1.0\nx\n")
    with pytest.raises(WorkloadError, match="malformed"):
        load_trace(tmp_path / "t.txt")
    with pytest.raises(WorkloadError, match="not found"):
        load_trace(tmp_path / "none.txt")
    np.save(tmp_path / "p.npy", np.ones(4) / 4)
    with pytest.raises(WorkloadError, match="expected 8"):
        load_popularity(tmp_path / "p.npy", 8)


def test_rescaled_seeded_workload():
    times = np.array([10.0, 10.5, 11.0, 12.0])
    scale = time_scale(times, 3, 30.0)
    assert scale == pytest.approx(30.0)
    names = ["a", "b"]
    first = build_workload(times, np.array([0.9, 0.1]), names, 3, scale, (4, 6), (2, 3), 100, seed=1)
    again = build_workload(times, np.array([0.9, 0.1]), names, 3, scale, (4, 6), (2, 3), 100, seed=1)
    assert first == again
    assert [a.time_s for a in first] == pytest.approx([0.0, 15.0, 30.0])
    assert all(4 <= len(a.prompt_ids) <= 6 and 2 <= a.max_tokens <= 3 and a.adapter in names for a in first)
