"""The engine with tiered residency: on_demand matches cached, loads never stall decoding, FIFO
without starvation, failures stay with their request, unload while running."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field

import pytest

from services.gpu_worker.engine import LLMEngine
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.request import EngineRequest, RequestError, SamplingParams
from services.gpu_worker.residency.config import ResidencyConfig
from tests.unit.gpu_worker.residency_fixtures import SMALL, residency_root, small_bytes, tiny_shape  # noqa: F401


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None
    error: str | None = None


@pytest.fixture
def make_engine(tiny_model_dir, residency_root):
    made = []

    def build(root=None, **residency) -> LLMEngine:
        cfg = ResidencyConfig(adapter_dir=str(root or residency_root), **residency)
        engine = LLMEngine(tiny_model_dir, EngineConfig(dtype="float32", device="cpu"), None, cfg)
        made.append(engine)
        return engine

    yield build
    for engine in made:
        engine.residency.close()


def add(engine: LLMEngine, rid: str, adapter: str | None, max_tokens: int = 6, prompt_len: int = 5) -> None:
    ids = [3 + (i * 7 + len(rid)) % 300 for i in range(prompt_len)]
    engine.add_request(EngineRequest(rid, ids, adapter, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                      ignore_eos=True)))


def step(engine: LLMEngine, results: dict[str, Result]) -> int:
    """One engine step (waiting for a load when nothing could run); returns how many outputs came."""
    outputs = engine.step()
    for o in outputs:
        r = results.setdefault(o.request_id, Result())
        r.tokens += o.new_token_ids
        if o.finished:
            r.reason, r.error = o.finish_reason, o.error
    if not outputs:
        engine.residency.wait_for_progress(0.02)
    return len(outputs)


def drain(engine: LLMEngine, results: dict[str, Result], timeout: float = 30.0) -> dict[str, Result]:
    deadline = time.monotonic() + timeout
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "engine did not finish"
        step(engine, results)
    return results


def _workload(engine: LLMEngine) -> None:
    names = (SMALL + [None]) * 3
    for i, name in enumerate(names):
        add(engine, f"r{i}", name, max_tokens=5 + i % 4, prompt_len=3 + i % 9)


def test_on_demand_outputs_match_cached(make_engine, tiny_shape):
    cached = make_engine(cold_start="cached")
    while cached.residency.pending_loads():  # let the preload finish so every request is a hit
        cached.step()
        cached.residency.wait_for_progress(0.02)
    _workload(cached)
    expected = drain(cached, {})
    on_demand = make_engine(cold_start="on_demand", device_adapter_bytes=2 * small_bytes(tiny_shape),
                            emulate_link_gbps=0.01, emulate_link_latency_ms=2.0, load_groups=2)
    _workload(on_demand)
    got = drain(on_demand, {})
    assert {k: v.tokens for k, v in got.items()} == {k: v.tokens for k, v in expected.items()}
    assert all(r.reason == "length" for r in got.values())
    report = on_demand.residency.report().to_dict()
    assert report["loads"] >= len(SMALL) and report["evictions"] > 0 and report["misses"] > 0
    assert cached.residency.report().to_dict()["hit_rate"] == 1.0


def test_other_requests_keep_decoding_while_a_load_is_in_flight(make_engine):
    engine = make_engine(emulate_link_latency_ms=1500.0)
    results: dict[str, Result] = {}
    add(engine, "base", None, max_tokens=400)
    for _ in range(3):
        step(engine, results)
    add(engine, "cold", "a0", max_tokens=2)
    slowest, tokens_before = 0.0, len(results["base"].tokens)
    start = time.monotonic()
    while "cold" not in results:
        t = time.monotonic()
        step(engine, results)
        slowest = max(slowest, time.monotonic() - t)
    waited = time.monotonic() - start
    assert waited >= 1.5  # the cold request waited for its load ...
    assert len(results["base"].tokens) - tokens_before >= 5  # ... while the base request kept decoding
    assert slowest < 0.75, f"a step took {slowest:.3f}s: the step loop blocked on the load"
    engine.abort("base")
    drain(engine, results)


def test_fifo_no_starvation_when_busy_adapters_fill_the_cache(make_engine, tiny_shape):
    engine = make_engine(device_adapter_bytes=2 * small_bytes(tiny_shape))
    results: dict[str, Result] = {}
    finished_at: dict[str, int] = {}
    deadline, i = time.monotonic() + 20, 0
    while "cold3" not in finished_at:  # a0 and a1 never go idle on their own: new requests keep arriving
        assert time.monotonic() < deadline, "cold requests starved behind busy adapters"
        add(engine, f"hot0-{i}", "a0", max_tokens=4)
        add(engine, f"hot1-{i}", "a1", max_tokens=4)
        if i == 2:
            add(engine, "cold2", "a2", max_tokens=3)
            add(engine, "cold3", "a3", max_tokens=3)
        step(engine, results)
        finished_at.update({rid: i for rid, r in results.items() if r.reason and rid not in finished_at})
        i += 1
    drain(engine, results)
    assert all(r.reason == "length" and r.error is None for r in results.values())
    assert finished_at["cold2"] <= finished_at["cold3"]  # a2 asked first, served first


def test_corrupt_adapter_fails_its_requests_only(tmp_path, make_engine, residency_root, bad_adapters, tiny_shape):
    for name in ("a0", "a1"):
        shutil.copytree(residency_root / name, tmp_path / name)
    shutil.copytree(bad_adapters["nan"], tmp_path / "nan")
    engine = make_engine(root=tmp_path, device_adapter_bytes=4 * small_bytes(tiny_shape))
    add(engine, "good0", "a0", max_tokens=4)
    add(engine, "bad", "nan", max_tokens=4)
    add(engine, "bad2", "nan", max_tokens=4)
    add(engine, "good1", "a1", max_tokens=4)
    add(engine, "base", None, max_tokens=4)
    results = drain(engine, {})
    assert results["bad"].reason == "error" and "NaN" in results["bad"].error and results["bad2"].reason == "error"
    assert all(results[r].reason == "length" and len(results[r].tokens) == 4 for r in ("good0", "good1", "base"))
    reference = make_engine(root=tmp_path, device_adapter_bytes=4 * small_bytes(tiny_shape))
    add(reference, "good0", "a0", max_tokens=4)
    assert drain(reference, {})["good0"].tokens == results["good0"].tokens


def test_oversize_adapter_fails_its_request_only(make_engine, tiny_shape):
    engine = make_engine(device_adapter_bytes=4 * small_bytes(tiny_shape))
    add(engine, "big", "big", max_tokens=3)
    add(engine, "small", "a0", max_tokens=3)
    results = drain(engine, {})
    assert results["big"].reason == "error" and "whole device adapter budget" in results["big"].error
    assert results["small"].reason == "length"


def test_unknown_adapter_is_a_request_error(make_engine):
    engine = make_engine()
    with pytest.raises(RequestError, match="unknown adapter 'nope'"):
        add(engine, "x", "nope")


def test_unload_while_running(make_engine, tiny_shape):
    engine = make_engine(device_adapter_bytes=2 * small_bytes(tiny_shape))
    results: dict[str, Result] = {}
    add(engine, "running", "a0", max_tokens=12)
    while len(results.get("running", Result()).tokens) < 3:
        step(engine, results)
    add(engine, "queued", "a0", max_tokens=12)  # accepted, not yet admitted when the unload lands
    engine.residency.unregister("a0")
    with pytest.raises(RequestError, match="unknown adapter 'a0'"):
        add(engine, "new", "a0")
    drain(engine, results)
    assert results["running"].reason == "length" and len(results["running"].tokens) == 12
    assert results["queued"].reason == "error" and "unknown adapter" in results["queued"].error
    assert "a0" not in engine.residency.cache
    engine.residency.register("a0", "a0")
    add(engine, "again", "a0", max_tokens=2)
    assert drain(engine, results)["again"].reason == "length"
