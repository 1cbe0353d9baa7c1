"""The profiler measures real engine steps and writes a profile the perf model loads back."""

from __future__ import annotations

import pytest

from services.gpu_worker.profiling import profiler as profiler_mod
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.profiling.config import ProfileConfig
from services.gpu_worker.profiling.profiler import profile
from shared.config import ConfigError
from shared.perf_model import PerfModel, ProfileMismatchError


@pytest.fixture
def few_adapters(monkeypatch, tmp_path):
    monkeypatch.setenv("CARASERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(profiler_mod, "ADAPTERS_PER_RANK", 2)


@pytest.mark.parametrize("backend", ["bgmv", "mbgmv"])
def test_profile_samples_real_steps_and_round_trips(backend, tiny_model_dir, tmp_path, few_adapters):
    config = ProfileConfig(batch_sizes=(1, 2, 4), ranks=(8, 32), mixed_draws=1, decode_steps=3, repeats=2,
                           prompt_min=4, prompt_max=12)
    seen = []
    model = profile(tiny_model_dir, EngineConfig(backend=backend, dtype="float32", device="cpu"), config,
                    lambda stage, done, total: seen.append((stage, done, total)))
    decode = [s for s in model.samples if s["phase"] == "decode"]
    points = len(profiler_mod.Profiler.grid(profiler_mod.Profiler(None, config, {})))
    stepped = [(done, total) for stage, done, total in seen if stage == "steps"]
    assert len(decode) == points and stepped[-1] == (2 * points, 2 * points)  # one sample per point, two passes
    assert {len(s["ranks"]) for s in decode} == {1, 2, 4}
    assert any(set(s["ranks"]) == {0} for s in decode) and any(8 in s["ranks"] and 32 in s["ranks"] for s in decode)
    steps = [s for s in model.samples if s["phase"] in ("decode", "prefill")]
    assert all(s["latency_us"] > 0 for s in steps)
    assert all(s["latency_us"] >= 0 for s in model.samples)  # a cold start can cost nothing measurable
    assert any(s["phase"] == "prefill" for s in model.samples)
    path = tmp_path / "p.json"
    model.save(path)
    loaded = PerfModel.load(path, expect_model=tiny_model_dir.name, expect_device=model.info.device_name)
    assert loaded.info.backend == backend and loaded.decode.terms
    with pytest.raises(ProfileMismatchError):
        PerfModel.load(path, expect_device="NVIDIA H100 80GB HBM3")
    with pytest.raises(ProfileMismatchError):
        PerfModel.load(path, expect_model="Llama-2-7b")


def test_a_point_keeps_its_fastest_pass_among_identical_ones():
    def sample(phase, latency, tokens=(5, 7)):
        return {"phase": phase, "ranks": [8, 8], "tokens": list(tokens), "adapters": ["a", "b"], "latency_us": latency}

    runs = [[sample("prefill", 900.0), sample("decode", 300.0)],
            [sample("prefill", 700.0), sample("decode", 450.0)],
            [sample("prefill", 100.0, tokens=(5, 8)), sample("decode", 50.0)]]  # stepped differently: ignored
    merged = profiler_mod.fastest(runs)
    assert [s["latency_us"] for s in merged] == [700.0, 300.0]
    assert merged[0]["tokens"] == [5, 7] and merged[1]["phase"] == "decode"


def test_bad_grid_is_rejected():
    with pytest.raises(ConfigError):
        ProfileConfig(batch_sizes=(0,))
    with pytest.raises(ConfigError):
        ProfileConfig(targets=("lm_head",))
    with pytest.raises(ConfigError):
        ProfileConfig(repeats=0)
