"""A failure inside an engine step fails only the requests it can be pinned on, with a final error,
frees their KV blocks, and the engine goes on serving (issue 13 §1)."""

from __future__ import annotations

import pytest

from services.gpu_worker.engine import LLMEngine
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.request import EngineRequest, SamplingParams
from tests.unit.gpu_worker.test_engine_behaviour import collect

FP32 = dict(dtype="float32", device="cpu")


def greedy(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


@pytest.fixture
def engine(tiny_model_dir) -> LLMEngine:
    return LLMEngine(tiny_model_dir, EngineConfig(**FP32))


def add(engine: LLMEngine, *request_ids: str, max_tokens: int = 6) -> None:
    for i, request_id in enumerate(request_ids):
        engine.add_request(EngineRequest(request_id, [5 + i, 6, 7, 8], None, greedy(max_tokens)))


def reference(tiny_model_dir, *request_ids: str) -> dict[str, list[int]]:
    clean = LLMEngine(tiny_model_dir, EngineConfig(**FP32))
    add(clean, *request_ids)
    return {rid: rec["ids"] for rid, rec in collect(clean).items()}


def poison_runner(engine: LLMEngine, poisoned: str, times: int | None = None) -> list[int]:
    """Make the runner raise for every plan holding ``poisoned`` (``times`` times at most); returns the
    list that counts the raises."""
    run, raised = engine.runner.run, []

    def faulty(plan):
        if any(s.request_id == poisoned for s in plan.prefill + plan.decode) and (times is None or len(raised) < times):
            raised.append(1)
            raise RuntimeError("injected kernel fault")
        return run(plan)

    engine.runner.run = faulty
    return raised


def assert_all_blocks_free(engine: LLMEngine) -> None:
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not engine.admission.running and not engine.admission.waiting


def test_a_poison_request_fails_alone_and_its_batch_completes(engine, tiny_model_dir):
    add(engine, "good-1", "bad", "good-2")
    raised = poison_runner(engine, "bad")
    out = collect(engine)
    assert raised
    assert out["bad"]["reason"] == "error" and out["bad"]["finals"] == 1
    expected = reference(tiny_model_dir, "good-1", "bad", "good-2")
    for rid in ("good-1", "good-2"):
        assert out[rid]["reason"] == "length" and out[rid]["finals"] == 1
        assert out[rid]["ids"] == expected[rid]  # running alone after the failed batch changed nothing
    assert_all_blocks_free(engine)
    add(engine, "later")
    assert collect(engine)["later"]["reason"] == "length"


def test_a_transient_fault_fails_nobody(engine, tiny_model_dir):
    add(engine, "a", "b")
    raised = poison_runner(engine, "a", times=1)
    out = collect(engine)
    assert raised == [1]
    assert {rid: rec["ids"] for rid, rec in out.items()} == reference(tiny_model_dir, "a", "b")


def test_a_failure_handling_one_requests_token_fails_only_that_request(engine):
    add(engine, "ok", "broken")
    engine.step()  # both prefilled

    class BrokenDetokenizer:
        def step(self, ids):
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    engine._live["broken"].detokenizer = BrokenDetokenizer()
    out = collect(engine)
    assert out["broken"]["reason"] == "error" and out["broken"]["finals"] == 1
    assert out["ok"]["reason"] == "length"
    assert_all_blocks_free(engine)


def test_a_planning_failure_fails_what_the_engine_holds_and_serving_goes_on(engine):
    add(engine, "x", "y")
    engine.step()
    poll, calls = engine.residency.poll, []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected adapter store fault")
        poll()

    engine.residency.poll = failing_once
    outputs = engine.step()
    assert sorted(o.request_id for o in outputs if o.finished) == ["x", "y"]
    assert all(o.finish_reason == "error" and "RuntimeError" in o.error for o in outputs)
    assert_all_blocks_free(engine)
    add(engine, "x")  # the id is free again
    assert collect(engine)["x"]["reason"] == "length"
