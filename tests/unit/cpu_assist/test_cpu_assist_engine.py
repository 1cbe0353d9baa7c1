"""CPU-assisted prefill end to end: the tiny fp32 model, peft adapters, a real CPU pool on a real ring.

The link is EMULATED and slow, so cold adapters' layers are mostly computed by the pool; outputs
must equal cached mode request by request (greedy ids, last-step logits within 1e-4), mixed in
one batch with device-resident and base-model requests.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

import pytest
import torch

from launcher.local_pool import LocalPool
from services.gpu_worker.engine import LLMEngine
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.request import EngineRequest, SamplingParams
from services.gpu_worker.residency.config import ResidencyConfig
from tests.unit.gpu_worker.test_engine_correctness import _requests, run_engine

FP32 = dict(dtype="float32", device="cpu", num_threads=1)
MAX_NEW = 6
LAYERS = 3  # the tiny model's


def shm_names(worker_id: str) -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"caraserve-{worker_id}-")}


def assist_config(**overrides) -> ResidencyConfig:
    """A slow EMULATED link (about a second per adapter) and a 2-process pool splitting every 4 tokens."""
    values = dict(cold_start="cpu_assist", emulate_link_gbps=2e-5, emulate_link_latency_ms=300.0, load_groups=4,
                  cpu_prefill_workers=2, assist_tokens_per_core=4, assist_deadline_ms=2000.0)
    return ResidencyConfig(**{**values, **overrides})


@pytest.fixture
def worker_id() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def run_assisted(tiny_model_dir: Path, adapters: dict, requests, worker_id: str, warm: list[str] = (),
                 config: ResidencyConfig | None = None):
    """Run ``requests`` greedily in cpu_assist mode (after loading ``warm`` adapters onto the device)."""
    engine = LLMEngine(tiny_model_dir, EngineConfig(**FP32), adapters, config or assist_config(), worker_id=worker_id)
    try:
        with LocalPool(engine.pool):
            if warm:
                run_engine(engine, [([5, 6, 7], name) for name in warm], max_new=1)
            result = run_engine(engine, requests, max_new=MAX_NEW, keep_logits=True)
            return result, engine.residency.report().assist
    finally:
        engine.close()


def test_assisted_outputs_equal_cached_in_a_mixed_batch(tiny_model_dir, tiny_adapters, worker_id):
    names = list(tiny_adapters)
    requests = _requests(names + [None, "qv_r8", None], vocab=384, seed=11)
    cached = run_engine(LLMEngine(tiny_model_dir, EngineConfig(**FP32), dict(tiny_adapters)), requests,
                        max_new=MAX_NEW, keep_logits=True)
    # a 5x faster link than the other cases: every load still outlasts the prefill step (300 ms latency each)
    (ids, logits), assist = run_assisted(tiny_model_dir, dict(tiny_adapters), requests, worker_id, warm=["qv_r8"],
                                         config=assist_config(emulate_link_gbps=1e-4))
    assert ids == cached[0]
    for got, want in zip(logits, cached[1]):
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert assist.assisted >= len(names) - 1 and assist.cpu_layers > 0 and assist.fallbacks == 0
    assert not shm_names(worker_id)


def test_a_wrong_layer_from_the_pool_fails_the_comparison(tiny_model_dir, tiny_adapters, worker_id, monkeypatch):
    """The comparison above can fail: deltas applied one layer off give other logits."""
    from services.gpu_worker.residency.assist_exchange import AssistExchange

    post = AssistExchange._post

    def off_by_one(self, layer, group, x, part):
        return post(self, (layer + 1) % LAYERS, group, x, part)

    monkeypatch.setattr(AssistExchange, "_post", off_by_one)
    requests = _requests(["all7_r16", "alllinear_r32"], vocab=384, seed=3)
    cached = run_engine(LLMEngine(tiny_model_dir, EngineConfig(**FP32), dict(tiny_adapters)), requests,
                        max_new=MAX_NEW, keep_logits=True)
    (ids, logits), _ = run_assisted(tiny_model_dir, dict(tiny_adapters), requests, worker_id)
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(logits, cached[1]))


def test_prefill_lora_says_where_deltas_came_from(tiny_model_dir, tiny_adapters, worker_id):
    engine = LLMEngine(tiny_model_dir, EngineConfig(**FP32), dict(tiny_adapters), assist_config(), worker_id=worker_id)
    try:
        with LocalPool(engine.pool):
            engine.add_request(EngineRequest("cold", [5, 9, 13, 17, 21, 25], "all7_r16",
                                             SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)))
            firsts = []
            while engine.has_unfinished():
                firsts += [o.prefill_lora for o in engine.step() if o.first_token]
    finally:
        engine.close()
    (lora,) = firsts
    assert lora.cpu_layers == LAYERS and lora.device_layers == 0 and lora.fallback is None
    assert lora.waited_ms < 2000  # only for its host copy (disk -> host), not for the slow link


def test_sigkill_of_a_cpu_process_mid_prefill_falls_back_without_wrong_tokens(tiny_model_dir, tiny_adapters,
                                                                             worker_id, monkeypatch):
    from services.gpu_worker.residency.assist_exchange import AssistExchange

    requests = _requests(["all7_r16", "rslora_r16", "pattern_r8"], vocab=384, seed=4)
    cached = run_engine(LLMEngine(tiny_model_dir, EngineConfig(**FP32), dict(tiny_adapters)), requests,
                        max_new=MAX_NEW)
    engine = LLMEngine(tiny_model_dir, EngineConfig(**FP32), dict(tiny_adapters),
                       assist_config(assist_deadline_ms=300.0), worker_id=worker_id)
    start, killed = AssistExchange.start, []
    try:
        with LocalPool(engine.pool) as local:
            def kill_mid_prefill(self, layer, group, x, parts):
                if layer == 1 and not killed:  # layer 0's deltas came back; now the pool's processes die
                    killed.extend(local.pool.pids())
                    for pid in killed:
                        os.kill(pid, signal.SIGKILL)
                start(self, layer, group, x, parts)

            monkeypatch.setattr(AssistExchange, "start", kill_mid_prefill)
            started = time.monotonic()
            ids = run_engine(engine, requests, max_new=MAX_NEW)
            assert time.monotonic() - started < 30
            report = engine.residency.report().assist
    finally:
        engine.close()
    assert killed and ids == cached  # the killed prefills fell back and were computed again: same tokens
    assert report.fallbacks >= 1 and report.late >= 1
    assert not shm_names(worker_id)


def test_a_stopped_pool_means_waiting_not_hanging(tiny_model_dir, tiny_adapters, worker_id):
    requests = _requests(["all7_r16", None], vocab=384, seed=6)
    cached = run_engine(LLMEngine(tiny_model_dir, EngineConfig(**FP32), dict(tiny_adapters)), requests,
                        max_new=MAX_NEW)
    engine = LLMEngine(tiny_model_dir, EngineConfig(**FP32), dict(tiny_adapters), assist_config(), worker_id=worker_id)
    try:
        with LocalPool(engine.pool):
            pass  # the pool stops: its heartbeats end
        time.sleep(1.6)  # past MISSED_BEATS heartbeats
        assert not engine.pool.healthy()
        assert run_engine(engine, requests, max_new=MAX_NEW) == cached
        assert engine.residency.report().assist.assisted == 0
    finally:
        engine.close()
    assert not shm_names(worker_id)


def test_a_stale_segment_of_a_killed_run_is_removed_at_start(tiny_model_dir, tiny_adapters, worker_id, tmp_path):
    import subprocess
    import sys

    script = (f"import os, signal, torch\n"
              f"from shared.llama_shape import LlamaShape\n"
              f"from shared.shm_exchange import ExchangeRing, RingGeometry, segment_prefix\n"
              f"shape = LlamaShape.from_model_dir({str(tiny_model_dir)!r})\n"
              f"ExchangeRing.create(segment_prefix({worker_id!r}), RingGeometry(shape, 'float32', 64, 2, 1))\n"
              f"os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[3], check=False)
    stale = shm_names(worker_id)
    assert stale, "the killed run should have left its ring behind"
    engine = LLMEngine(tiny_model_dir, EngineConfig(**FP32), dict(tiny_adapters), assist_config(), worker_id=worker_id)
    try:
        assert not (shm_names(worker_id) & stale)
    finally:
        engine.close()
    assert not shm_names(worker_id)
