"""The engine's mixed batches match transformers+peft run request by request."""

from __future__ import annotations

import random

import pytest
import torch

from services.gpu_worker.engine import LLMEngine
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.request import EngineRequest, SamplingParams
from tests.hf_reference import HFReference

MAX_NEW = 8


def _requests(adapters: list[str | None], vocab: int, seed: int = 0) -> list[tuple[list[int], str | None]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(3, 24))], name) for name in adapters]


def run_engine(engine: LLMEngine, requests, max_new: int = MAX_NEW, keep_logits: bool = False):
    """Greedy-run all requests in one mixed batch; returns ids (and last-step logits) per request."""
    last_logits: dict[str, torch.Tensor] = {}
    engine.record_logits = keep_logits
    for i, (ids, adapter) in enumerate(requests):
        engine.add_request(EngineRequest(f"r{i}", ids, adapter, SamplingParams(max_tokens=max_new, temperature=0,
                                                                               ignore_eos=True)))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(requests))}
    while engine.has_unfinished():
        outputs = engine.step()
        for o in outputs:
            out[o.request_id] += o.new_token_ids
            if o.logits is not None:
                last_logits[o.request_id] = o.logits
        if engine.idle and not outputs:  # waiting for adapter loads: block as the step thread does, not spin
            engine.wait_for_work(0.05)
    ids = [out[f"r{i}"] for i in range(len(requests))]
    return (ids, [last_logits[f"r{i}"] for i in range(len(requests))]) if keep_logits else ids


@pytest.fixture(scope="module")
def mixed_requests(tiny_adapters):
    return _requests((list(tiny_adapters) + [None, None]) * 2, vocab=384)


@pytest.fixture(scope="module")
def reference_results(tiny_model_dir, tiny_adapters, mixed_requests):
    """transformers+peft, one request at a time (computed once for every backend below)."""
    reference = HFReference(tiny_model_dir, tiny_adapters)
    return [reference.generate(ids, adapter, MAX_NEW) for ids, adapter in mixed_requests]


@pytest.mark.parametrize("backend", ["bgmv", "mbgmv"])
@pytest.mark.parametrize("native", [True, False])
def test_mixed_batch_matches_peft(backend, native, tiny_model_dir, tiny_adapters, mixed_requests,
                                  reference_results):
    engine = LLMEngine(tiny_model_dir, EngineConfig(backend=backend, dtype="float32", device="cpu",
                                                    native_ops=native), dict(tiny_adapters))
    got, logits = run_engine(engine, mixed_requests, keep_logits=True)
    for (ids, adapter), tokens, last, ref in zip(mixed_requests, got, logits, reference_results):
        assert tokens == ref.token_ids, f"adapter {adapter}"
        assert torch.allclose(last, ref.last_logits, atol=1e-4, rtol=0), (adapter, (last - ref.last_logits).abs().max())
