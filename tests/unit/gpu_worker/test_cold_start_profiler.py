"""Cold-start profiling: samples time real on_demand loads, and the fit prices them by level."""

from __future__ import annotations

import pytest

from services.gpu_worker.profiling import cold_start as cold_start_profiler
from services.gpu_worker.profiling import profiler as profiler_mod
from services.gpu_worker.profiling.cold_start import prompt_lengths
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.profiling.config import ProfileConfig
from services.gpu_worker.profiling.profiler import add_cold_starts, profile
from shared.perf_model import ProfileError, ProfileMismatchError

LOAD_MS = 40.0  # EMULATED latency of every load: the cold samples must see it
GRID = dict(batch_sizes=(1, 2, 4), ranks=(8, 32), mixed_draws=1, decode_steps=3, repeats=2, prompt_min=4,
            prompt_max=12)


@pytest.fixture
def few_adapters(monkeypatch, tmp_path):
    monkeypatch.setenv("CARASERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(profiler_mod, "ADAPTERS_PER_RANK", 2)


def engine_config(backend: str = "bgmv") -> EngineConfig:
    return EngineConfig(backend=backend, dtype="float32", device="cpu")


def test_cold_samples_time_the_load_at_each_level(tiny_model_dir, few_adapters):
    config = ProfileConfig(**GRID, emulate_link_latency_ms=LOAD_MS)
    stages = set()
    model = profile(tiny_model_dir, engine_config(), config, lambda stage, d, t: stages.add(stage))
    assert stages == {"steps", "cold starts"}
    for level in ("host", "disk"):
        samples = [s for s in model.samples if s["phase"] == f"cold_{level}"]
        assert len(samples) == 2 * len(prompt_lengths(4, 12))  # ranks x prompt lengths
        assert all(s["latency_us"] >= 0.8 * LOAD_MS * 1e3 for s in samples), samples
        assert model.cold_start_us(8, 8, level) >= 0.8 * LOAD_MS * 1e3
    assert model.cold_start_us(8, 8, "device") == 0.0
    assert "EMULATED" in model.info.cold_start_link and f"{LOAD_MS:g} ms" in model.info.cold_start_link


def test_profiling_without_cold_starts_prices_loads_at_zero(tiny_model_dir, few_adapters):
    model = profile(tiny_model_dir, engine_config(), ProfileConfig(**GRID, cold_start=False))
    assert not any(s["phase"].startswith("cold_") for s in model.samples)
    assert model.cold_start == {} and model.info.cold_start_link == ""


def test_adding_cold_starts_keeps_the_step_fits(tiny_model_dir, few_adapters, tmp_path):
    base = profile(tiny_model_dir, engine_config(), ProfileConfig(**GRID, cold_start=False))
    updated = add_cold_starts(base, tiny_model_dir, engine_config(),
                              ProfileConfig(**GRID, emulate_link_latency_ms=LOAD_MS))
    assert updated.decode.to_dict() == base.decode.to_dict()
    assert updated.prefill.to_dict() == base.prefill.to_dict()
    assert set(updated.cold_start) == {"host", "disk"}
    assert updated.cold_start_us(32, 8, "host") >= 0.8 * LOAD_MS * 1e3
    assert updated.info.model_digest == base.info.model_digest
    with pytest.raises(ProfileMismatchError):
        add_cold_starts(base, tiny_model_dir, engine_config("mbgmv"), ProfileConfig(**GRID))


def test_a_request_that_never_gets_its_first_token_is_a_typed_error(tiny_model_dir, few_adapters, monkeypatch):
    monkeypatch.setattr(cold_start_profiler, "FIRST_TOKEN_TIMEOUT_S", 0.0)
    config = ProfileConfig(**GRID, emulate_link_latency_ms=LOAD_MS)
    paths, by_rank = profiler_mod.profiling_adapters(tiny_model_dir, config)
    with pytest.raises(ProfileError, match="no first token"):
        profiler_mod.measure_cold_starts(tiny_model_dir, engine_config(), config, paths, by_rank)
