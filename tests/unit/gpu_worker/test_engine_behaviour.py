"""Engine behaviour: preemption, stops, seeds, abort, adapter rejection, the external-delta seam."""

from __future__ import annotations

import logging

import pytest
import torch

from services.gpu_worker.lora_plan import ExternalSource
from services.gpu_worker.engine import LLMEngine
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.request import EngineRequest, RequestError, SamplingParams
from shared.llama_shape import LlamaShape
from shared.peft_adapter import AdapterError, LoraAdapter, load_adapter
from tests.hf_reference import HFReference
from tests.unit.gpu_worker.test_engine_correctness import _requests, run_engine

FP32 = dict(dtype="float32", device="cpu")


def collect(engine: LLMEngine) -> dict[str, dict]:
    """Step to completion; per request: ids, streamed text, finish reason, number of final chunks."""
    out: dict[str, dict] = {}
    while engine.has_unfinished():
        for o in engine.step():
            rec = out.setdefault(o.request_id, {"ids": [], "text": "", "reason": None, "finals": 0})
            rec["ids"] += o.new_token_ids
            rec["text"] += o.text_delta
            if o.finished:
                rec["reason"], rec["finals"] = o.finish_reason, rec["finals"] + 1
    return out


def greedy(max_tokens=12, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def test_preemption_recomputes_without_changing_outputs(tiny_model_dir, tiny_adapters):
    requests = _requests(list(tiny_adapters)[:4] * 2, vocab=384, seed=3)
    roomy = run_engine(LLMEngine(tiny_model_dir, EngineConfig(**FP32), dict(tiny_adapters)), requests, max_new=20)
    tight = LLMEngine(tiny_model_dir, EngineConfig(num_kv_blocks=6, block_size=8, **FP32), dict(tiny_adapters))
    assert run_engine(tight, requests, max_new=20) == roomy
    assert tight.num_preemptions > 0
    assert tight.blocks.num_free_blocks == tight.blocks.num_blocks


def test_request_larger_than_the_cache_fails_alone(tiny_model_dir):
    engine = LLMEngine(tiny_model_dir, EngineConfig(num_kv_blocks=2, block_size=4, **FP32))
    engine.add_request(EngineRequest("big", list(range(3, 40)), None, greedy(4)))
    engine.add_request(EngineRequest("small", [5, 6], None, greedy(4)))
    out = collect(engine)
    assert out["big"]["reason"] == "error" and out["small"]["reason"] == "length"


def test_stop_strings_and_stop_tokens(tiny_model_dir):
    engine = LLMEngine(tiny_model_dir, EngineConfig(**FP32))
    prompt = [7, 8, 9, 10]
    engine.add_request(EngineRequest("free", prompt, None, greedy(16)))
    free = collect(engine)["free"]
    assert len(free["text"]) > 6
    stop = free["text"][3:6]
    engine.add_request(EngineRequest("s", prompt, None, greedy(16, stop=(stop,))))
    engine.add_request(EngineRequest("t", prompt, None, greedy(16, stop_token_ids=(free["ids"][4],))))
    out = collect(engine)
    assert out["s"]["reason"] == "stop" and out["s"]["text"] == free["text"][:free["text"].find(stop)]
    assert out["t"]["reason"] == "stop" and out["t"]["ids"] == free["ids"][:free["ids"].index(free["ids"][4]) + 1]
    assert all(rec["finals"] == 1 for rec in out.values())


def test_eos_stops_unless_ignored(tiny_model_dir):
    engine = LLMEngine(tiny_model_dir, EngineConfig(**FP32))
    engine.eos_ids = {engine.eos_ids.pop()}
    prompt = [11, 12, 13]
    engine.add_request(EngineRequest("g", prompt, None, greedy(6)))
    first = collect(engine)["g"]["ids"][2]
    engine.eos_ids = {first}  # pretend the third greedy token is EOS
    engine.add_request(EngineRequest("eos", prompt, None, SamplingParams(max_tokens=6, temperature=0)))
    engine.add_request(EngineRequest("ign", prompt, None, greedy(6)))
    out = collect(engine)
    assert out["eos"]["reason"] == "stop" and len(out["eos"]["ids"]) == 3
    assert out["ign"]["reason"] == "length" and len(out["ign"]["ids"]) == 6


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_model_dir):
    params = dict(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, ignore_eos=True)
    engine = LLMEngine(tiny_model_dir, EngineConfig(**FP32))
    engine.add_request(EngineRequest("alone", [3, 4, 5], None, SamplingParams(seed=42, **params)))
    alone = collect(engine)["alone"]["ids"]
    for i in range(4):
        engine.add_request(EngineRequest(f"n{i}", [9, 9, i + 3], None, SamplingParams(seed=i, **params)))
    engine.add_request(EngineRequest("again", [3, 4, 5], None, SamplingParams(seed=42, **params)))
    engine.add_request(EngineRequest("other", [3, 4, 5], None, SamplingParams(seed=43, **params)))
    out = collect(engine)
    assert out["again"]["ids"] == alone
    assert out["other"]["ids"] != alone


def test_abort_frees_blocks_and_sends_one_final_chunk(tiny_model_dir):
    engine = LLMEngine(tiny_model_dir, EngineConfig(**FP32))
    engine.add_request(EngineRequest("keep", [3, 4, 5], None, greedy(10)))
    engine.add_request(EngineRequest("drop", [3, 4, 5, 6], None, greedy(1000)))
    engine.step()
    engine.step()
    engine.abort("drop")
    out = collect(engine)
    assert out["drop"]["reason"] == "cancelled" and out["drop"]["finals"] == 1
    assert out["keep"]["reason"] == "length"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_invalid_requests_are_rejected(tiny_model_dir, tiny_adapters):
    engine = LLMEngine(tiny_model_dir, EngineConfig(max_model_len=64, **FP32), dict(tiny_adapters))
    bad = [([], None), ([1, 2], "nope"), ([10_000], None), (list(range(3, 80)), None)]
    for ids, adapter in bad:
        with pytest.raises(RequestError):
            engine.add_request(EngineRequest("x", ids, adapter, greedy()))
    with pytest.raises(RequestError):
        SamplingParams(max_tokens=0)
    with pytest.raises(RequestError):
        SamplingParams(top_p=0)
    engine.add_request(EngineRequest("dup", [3], None, greedy(2)))
    with pytest.raises(RequestError, match="duplicate"):
        engine.add_request(EngineRequest("dup", [3], None, greedy(2)))


REJECTIONS = {
    "dora": "use_dora", "modules_to_save": "modules_to_save", "lora_embed_tokens": "embeddings",
    "lora_lm_head": "lm_head", "bias": "bias", "rank_too_high": "exceeds", "shape_mismatch": "do not match",
    "nan": "NaN", "inf": "NaN or Inf", "missing_weights": "missing adapter_model",
    "corrupt_weights": "corrupt", "missing_config": "missing adapter_config", "invalid_config": "corrupt",
    "not_lora": "not LoRA",
}


@pytest.mark.parametrize("kind", sorted(REJECTIONS))
def test_bad_adapters_get_one_line_errors(kind, bad_adapters, tiny_model_dir):
    if kind not in bad_adapters:
        pytest.fail(f"fixture lacks bad adapter kind {kind}: {sorted(bad_adapters)}")
    with pytest.raises(AdapterError) as err:
        load_adapter("bad", bad_adapters[kind], LlamaShape.from_model_dir(tiny_model_dir), max_rank=64)
    message = str(err.value)
    assert message.startswith("adapter 'bad': ") and "\n" not in message
    assert REJECTIONS[kind].lower() in message.lower(), message


def test_mismatched_base_model_warns_only(bad_adapters, tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING):
        adapter = load_adapter("m", bad_adapters["mismatched_base"], LlamaShape.from_model_dir(tiny_model_dir),
                               base_model=str(tiny_model_dir))
    assert adapter.weights and "trained for base model" in caplog.text


class HostDeltas:
    """ExternalDeltas in plain torch from the host copies (what the CPU prefill pool computes)."""

    def __init__(self, adapters: dict[int, LoraAdapter]) -> None:
        self.adapters = adapters
        self.calls: list[tuple[int, str, int]] = []  # (layer, group, cold segments in the call)
        self.pending: list[torch.Tensor] = []

    def start(self, layer, group, x, parts) -> None:
        self.pending = [x[p.start:p.end].clone() for p in parts]
        self.calls.append((layer, group, len(parts)))

    def finish(self, layer, group, ys, parts) -> None:
        for part, rows in zip(parts, self.pending):
            for proj in part.projs:
                a, b = self.adapters[part.source.adapter_id].weights[(layer, proj)]
                ys[proj][part.start:part.end] += (rows.float() @ a.float() @ b.float()).to(ys[proj].dtype)


def _cold_first_layer(engine: LLMEngine) -> HostDeltas:
    """Make layer 0 of every adapter 'not resident': its deltas come from a HostDeltas instead."""
    residency = engine.residency
    full = {name: residency.device_adapter(name) for name in residency.names()}
    ids = {name: i for i, name in enumerate(full)}
    partial = {n: LoraAdapter(a.name, a.path, {k: w for k, w in a.weights.items() if k[0] != 0}) for n, a in full.items()}
    deltas = HostDeltas({ids[n]: a for n, a in full.items()})
    residency.device_adapter = partial.get
    residency.external = lambda rid, name: ExternalSource(rid, 0, ids[name], frozenset(k for k in full[name].weights
                                                                                     if k[0] == 0))
    residency.deltas = lambda: deltas
    return deltas


@pytest.mark.parametrize("backend", ["bgmv", "mbgmv"])
def test_deltas_supplied_from_outside_give_identical_outputs(backend, tiny_model_dir, tiny_adapters):
    requests = _requests(list(tiny_adapters) + [None], vocab=384, seed=5)
    config = EngineConfig(backend=backend, **FP32)
    full = run_engine(LLMEngine(tiny_model_dir, config, dict(tiny_adapters)), requests, keep_logits=True)
    engine = LLMEngine(tiny_model_dir, config, dict(tiny_adapters))
    deltas = _cold_first_layer(engine)
    split = run_engine(engine, requests, keep_logits=True)
    assert split[0] == full[0]
    for a, b in zip(split[1], full[1]):
        assert torch.allclose(a, b, atol=1e-5)
    # one call per (layer, input group) per step, covering every cold segment of the step
    assert deltas.calls and {layer for layer, _, _ in deltas.calls} == {0}
    assert max(n for _, _, n in deltas.calls) > 1
    assert len(deltas.calls) <= 4 * engine.steps  # not one call per projection or per segment


def test_a_wrong_external_delta_changes_the_output(tiny_model_dir, tiny_adapters):
    """The check above can fail: a delta added to the wrong projection gives other tokens."""
    requests = _requests(list(tiny_adapters), vocab=384, seed=5)
    config = EngineConfig(**FP32)
    full = run_engine(LLMEngine(tiny_model_dir, config, dict(tiny_adapters)), requests, keep_logits=True)
    engine = LLMEngine(tiny_model_dir, config, dict(tiny_adapters))
    deltas = _cold_first_layer(engine)
    finish = deltas.finish

    def swapped(layer, group, ys, parts):
        if group == "qkv":
            ys = {"q_proj": ys["q_proj"], "k_proj": ys["v_proj"], "v_proj": ys["k_proj"]}
        finish(layer, group, ys, parts)

    deltas.finish = swapped
    wrong = run_engine(engine, requests, keep_logits=True)
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(wrong[1], full[1]))


def test_tied_embeddings_and_llama3_rope_match_transformers(tiny_model_dir_tied):
    requests = _requests([None] * 3, vocab=384, seed=9)
    got, logits = run_engine(LLMEngine(tiny_model_dir_tied, EngineConfig(**FP32)), requests, keep_logits=True)
    reference = HFReference(tiny_model_dir_tied)
    for (ids, _), tokens, last in zip(requests, got, logits):
        ref = reference.generate(ids, None, 8)
        assert tokens == ref.token_ids
        assert torch.allclose(last, ref.last_logits, atol=1e-4)
