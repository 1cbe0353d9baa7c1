"""`caraserve profile --cpu-prefill` measures c and the worker's residency factory reads it back."""

from __future__ import annotations

import json
import math

import pytest
import torch

from launcher import cli
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.profiling import profiler as profiler_mod
from services.gpu_worker.profiling.cpu_prefill import CpuPrefillProfile, measure_tokens_per_core
from services.gpu_worker.profiling.profile_cache import model_digest
from services.gpu_worker.residency.config import DEFAULT_TOKENS_PER_CORE, ResidencyConfig
from services.gpu_worker.residency.factory import tokens_per_core
from shared.perf_model import PerfModel, ProfileError, current_device_name

SECTION = CpuPrefillProfile(tokens_per_core=96, rank=64, tokens=256, layer_ms=1.5, core_ms=4.0,
                            device_name="NVIDIA H100 80GB HBM3")


def _profile(**info) -> PerfModel:
    return PerfModel.from_coefficients("bgmv", {"const": 100.0, "requests": 7.0}, {"const": 300.0, "tokens": 2.0},
                                       **info)


def test_measurement_gives_a_c_consistent_with_its_own_timings(tiny_model_dir):
    threads = torch.get_num_threads()
    got = measure_tokens_per_core(tiny_model_dir, EngineConfig(dtype="float32", device="cpu"), rank=8, tokens=32,
                                  repeats=2)
    assert got.rank == 8 and got.tokens == 32 and got.layer_ms > 0 and got.core_ms > 0
    assert got.tokens_per_core >= 1
    assert got.tokens_per_core == max(1, math.floor(32 * got.layer_ms / got.core_ms))
    assert got.device_name == current_device_name("cpu")
    assert torch.get_num_threads() == threads  # the one-core timing restored torch's threads


def test_a_prompt_longer_than_one_step_is_refused(tiny_model_dir):
    with pytest.raises(ProfileError, match="max_batched_tokens"):
        measure_tokens_per_core(tiny_model_dir, EngineConfig(dtype="float32", device="cpu", max_batched_tokens=16),
                                tokens=32)


def test_profile_round_trips_with_and_without_the_section(tmp_path):
    plain, with_cpu = tmp_path / "plain.json", tmp_path / "cpu.json"
    _profile().save(plain)
    assert "cpu_prefill" not in json.loads(plain.read_text())  # old readers see the old format
    assert PerfModel.load(plain).cpu_prefill is None
    _profile().with_cpu_prefill(SECTION).save(with_cpu)
    loaded = PerfModel.load(with_cpu)
    assert loaded.cpu_prefill == SECTION
    assert loaded.decode.coefficient("requests") == 7.0
    assert CpuPrefillProfile.from_dict(SECTION.to_dict()) == SECTION


@pytest.mark.parametrize("bad", [{"tokens_per_core": 0}, {"core_ms": -1.0}, {"rank": "64"},
                                 {"layer_ms": float("nan")}])
def test_a_bad_section_is_refused(tmp_path, bad):
    raw = _profile().with_cpu_prefill(SECTION).to_dict()
    raw["cpu_prefill"].update(bad)
    with pytest.raises(ProfileError, match="cpu_prefill"):
        PerfModel.from_dict(raw)
    del raw["cpu_prefill"]["tokens_per_core"]
    with pytest.raises(ProfileError, match="missing tokens_per_core"):
        PerfModel.from_dict(raw)


def test_the_residency_factory_reads_c_from_the_profile(tmp_path):
    path = tmp_path / "p.json"
    _profile().with_cpu_prefill(SECTION).save(path)
    assert tokens_per_core(ResidencyConfig(cold_start="on_demand", cpu_prefill_profile=str(path))) == 96
    assert tokens_per_core(ResidencyConfig(cold_start="on_demand")) == DEFAULT_TOKENS_PER_CORE


def test_cli_adds_the_section_to_a_profile_made_here(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    _profile(device_name=current_device_name("cpu"), model=tiny_model_dir.name,
             model_digest=model_digest(tiny_model_dir), dtype="float32").save(out)
    argv = ["profile", "--backend", "bgmv", "--model", str(tiny_model_dir), "--dtype", "float32", "--device", "cpu",
            "--out", str(out), "--cpu-prefill"]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = PerfModel.load(out)
    assert saved.decode.coefficient("requests") == 7.0  # the existing fits were kept, not re-profiled
    assert saved.cpu_prefill is not None and saved.cpu_prefill.tokens_per_core >= 1
    assert printed["cpu_prefill"] == saved.cpu_prefill.to_dict()
    c = saved.cpu_prefill.tokens_per_core
    assert tokens_per_core(ResidencyConfig(cold_start="on_demand", cpu_prefill_profile=str(out))) == c


@pytest.mark.slow  # a real (small) full profile: about 30 s on two cores
def test_cli_profiles_in_full_over_another_models_profile(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CARASERVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(profiler_mod, "ADAPTERS_PER_RANK", 2)
    out = tmp_path / "p.json"
    _profile(device_name=current_device_name("cpu"), model="Llama-2-7b", model_digest="0" * 16).save(out)
    argv = ["profile", "--backend", "bgmv", "--model", str(tiny_model_dir), "--dtype", "float32", "--device", "cpu",
            "--out", str(out),
            "--cpu-prefill", "--batch-sizes", "1", "2", "4", "--ranks", "8", "16", "--mixed-draws", "0",
            "--decode-steps", "1", "--repeats", "1", "--prompt-min", "4", "--prompt-max", "8", "--no-cold-start"]
    assert cli.main(argv) == 0
    assert "profiling in full" in capsys.readouterr().err
    saved = PerfModel.load(out)
    assert saved.info.model_digest == model_digest(tiny_model_dir) and saved.samples
    assert saved.cpu_prefill is not None and saved.cpu_prefill.tokens_per_core >= 1
