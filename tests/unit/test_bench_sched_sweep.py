"""The scheduling sweep bench on synthetic profiles: its report, progress and parallel profiles."""

from __future__ import annotations

import json
import logging

from bench.routing import sched_sweep, synthetic_profile
from shared.backends import BACKENDS


def _run(tmp_path, caplog, jobs: int, *extra: str, policy: str = "rank_aware,least_loaded") -> tuple[dict, str]:
    caplog.clear()
    caplog.set_level(logging.INFO, logger="services.scheduler.sim.experiment")
    profiles = {}
    for backend in BACKENDS:
        profiles[backend] = tmp_path / f"{backend}.json"
        assert synthetic_profile.main(["--backend", backend, "--out", str(profiles[backend])]) == 0
    out = tmp_path / f"sweep-{jobs}.json"
    code = sched_sweep.main(["--profile-bgmv", str(profiles["bgmv"]), "--profile-mbgmv", str(profiles["mbgmv"]),
                             "--workers", "2", "--duration", "30", "--rates", "1,3,6", "--policy",
                             policy, "--jobs", str(jobs), "--out", str(out), *extra])
    assert code == 0
    return json.loads(out.read_text()), caplog.text


def _simulated(points: list[dict]) -> list[dict]:
    """The points without their wall-clock time."""
    return [{k: v for k, v in p.items() if k != "sim_seconds"} for p in points]


def test_the_sweep_reports_each_profile_the_same_whether_swept_in_parallel_or_not(tmp_path, caplog):
    serial, progress = _run(tmp_path, caplog, jobs=1)
    parallel, _ = _run(tmp_path, caplog, jobs=2)
    assert serial["synthetic"] and serial["workers"] == 2
    for backend in BACKENDS:
        result = serial["profiles"][backend]
        assert result["rates"] == [1.0, 3.0, 6.0] and set(result["policies"]) == {"rank_aware", "least_loaded"}
        assert all(len(points) == 3 for points in result["policies"].values())
        assert set(result["highest_rate_at_99"]) == {"rank_aware", "least_loaded"}
        assert f"[{backend}] 3/3 6.00 rps: rank_aware" in progress
        for name, points in result["policies"].items():
            assert _simulated(points) == _simulated(parallel["profiles"][backend]["policies"][name])
    assert (tmp_path / "sweep-1.png").stat().st_size > 0


def test_with_adapter_slots_adapter_affinity_follows_residency(tmp_path, caplog):
    """With every adapter resident everywhere adapter_affinity routes like least_loaded; with slots it does not."""
    policy = "adapter_affinity,least_loaded"
    everywhere, _ = _run(tmp_path, caplog, 1, "--workers", "8", policy=policy)
    cached, _ = _run(tmp_path, caplog, 1, "--workers", "8", "--adapter-slots", "4", policy=policy)
    assert everywhere["adapter_slots"] == 0 and cached["adapter_slots"] == 4
    for backend in BACKENDS:
        alike = everywhere["profiles"][backend]["policies"]
        assert _simulated(alike["adapter_affinity"]) == _simulated(alike["least_loaded"])
        apart = cached["profiles"][backend]["policies"]
        assert _simulated(apart["adapter_affinity"]) != _simulated(apart["least_loaded"])
