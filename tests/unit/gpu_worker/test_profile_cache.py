"""The profile cache: one file per (model digest, device, dtype, backend); a file that does not fit is not used."""

from __future__ import annotations

import logging

from services.gpu_worker.profiling.profile_cache import ProfileKey, profile_digest
from shared.perf_model import PerfModel


def profile(backend: str = "mbgmv", digest: str = "0123456789abcdef", dtype: str = "bfloat16") -> PerfModel:
    return PerfModel.from_coefficients(backend, {"const": 1.0}, {"const": 2.0}, model="m", model_digest=digest,
                                       device_name="Some CPU (R) 9000", dtype=dtype)


def test_a_cached_profile_is_found_by_its_key(tmp_path, monkeypatch):
    monkeypatch.setenv("CARASERVE_CACHE_DIR", str(tmp_path))
    key = ProfileKey("0123456789abcdef", "Some CPU (R) 9000", "bfloat16", "mbgmv")
    assert key.path.parent == tmp_path / "profiles" and key.path.name.endswith("-bfloat16-mbgmv.json")
    assert key.load() is None
    key.path.parent.mkdir(parents=True)
    profile().save(key.path)
    model, text = key.load()
    assert model.decode.coefficient("const") == 1.0 and text == key.path.read_text()
    assert profile_digest(text) == profile_digest(profile().to_text()) and len(profile_digest(text)) == 16


def test_a_file_made_for_another_model_or_dtype_is_not_used(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CARASERVE_CACHE_DIR", str(tmp_path))
    key = ProfileKey("0123456789abcdef", "Some CPU (R) 9000", "bfloat16", "mbgmv")
    key.path.parent.mkdir(parents=True)
    caplog.set_level(logging.WARNING)
    profile(digest="f" * 16).save(key.path)
    assert key.load() is None and "made for model digest 'ffffffffffffffff'" in caplog.text
    profile(dtype="float32").save(key.path)
    assert key.load() is None and "made for dtype 'float32'" in caplog.text
    key.path.write_text("{not json")
    assert key.load() is None and "invalid JSON" in caplog.text


def test_the_lock_is_exclusive_per_key(tmp_path, monkeypatch):
    monkeypatch.setenv("CARASERVE_CACHE_DIR", str(tmp_path))
    import fcntl

    key = ProfileKey("0123456789abcdef", "cpu", "bfloat16", "bgmv")
    with key.lock():
        with open(key.path.with_suffix(".lock")) as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                taken = False
            except BlockingIOError:
                taken = True
    assert taken


async def test_the_profilers_progress_reaches_the_log_once_per_stage_and_at_its_end(caplog):
    import asyncio

    from services.gpu_worker.profiling.worker_profile import _relay_progress

    caplog.set_level(logging.INFO, logger="services.gpu_worker.profiling.worker_profile")
    stream = asyncio.StreamReader()
    steps = "".join(f"\rprofiling steps: {k}/50 grid points" for k in range(1, 51))
    stream.feed_data(f"{steps}\n\rprofiling cold starts: 1/36 grid points\n".encode())
    stream.feed_eof()
    await _relay_progress(stream)
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["profile: profiling steps: 1/50 grid points", "profile: profiling steps: 50/50 grid points",
                      "profile: profiling cold starts: 1/36 grid points"]
