"""One benchmark run on our engine: every request submitted at t = 0, greedy, ignore_eos.

Besides the per-request timings, the run times every decode-only step (a step that admits no
request: all running sequences decode one token) and counts its FLOPs and the bytes it must
read from the model shape, so the caller can compare the decode steps' achieved FLOP/s and
bytes/s with the device's matmul peak and memory bandwidth.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench.engine.metrics import decode_step_bytes, decode_step_flops
from bench.engine.workload import BenchRequest
from bench.engine.run_record import RunRecord
from services.gpu_worker.engine import LLMEngine
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.request import EngineRequest, SamplingParams

WARMUP_PROMPT_TOKENS = 16


@dataclass
class DecodeTally:
    """Decode-only steps of a run: how many, their summed time, tokens, FLOPs and bytes read."""

    steps: int = 0
    time_s: float = 0.0
    tokens: int = 0
    flops: int = 0
    bytes_read: int = 0

    def to_dict(self) -> dict:
        per_s = (lambda x: x / self.time_s) if self.time_s else (lambda x: 0.0)
        return {"steps": self.steps, "time_s": self.time_s, "tokens": self.tokens, "flops": self.flops,
                "flops_per_s": per_s(self.flops), "bytes_read": self.bytes_read,
                "bytes_per_s": per_s(self.bytes_read)}


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _warm_up(engine: LLMEngine, request: BenchRequest, adapters: list[str]) -> None:
    """One short request per adapter (or one base request), run to completion untimed: one-time
    initialisation and adapter loads stay out of the timed window, as vLLM's warm-up does."""
    prompt = request.prompt_ids[:WARMUP_PROMPT_TOKENS]
    for i, adapter in enumerate(adapters or [None]):
        engine.add_request(EngineRequest(f"warm-up-{i}", prompt, adapter, _params(2)))
    while engine.has_unfinished():
        engine.step()


def run_engine(model_dir: Path, requests: list[BenchRequest], adapters: dict[str, Path] | None, backend: str,
               device: str, threads: int, step_tokens: int, label: str) -> tuple[RunRecord, DecodeTally]:
    """Serve ``requests`` (with their adapters, or on the base model when ``adapters`` is None), at most
    ``step_tokens`` tokens per step."""
    engine = LLMEngine(model_dir, EngineConfig(backend=backend, dtype="bfloat16", device=device, num_threads=threads,
                                               max_batched_tokens=step_tokens), dict(adapters or {}))
    use = (lambda r: r.adapter) if adapters else (lambda r: None)
    _warm_up(engine, requests[0], sorted(adapters or {}))
    wanted = {r.request_id: r.max_tokens for r in requests}
    record = RunRecord(label, wanted)
    record.start()
    for r in requests:
        engine.add_request(EngineRequest(r.request_id, r.prompt_ids, use(r), _params(r.max_tokens)))
    tally = _step_until_done(engine, record)
    record.progress(force=True)
    return record, tally


def _step_until_done(engine: LLMEngine, record: RunRecord) -> DecodeTally:
    shape, vocab = engine.model.config.shape, engine.model.config.vocab_size
    tally = DecodeTally()
    first_step = True
    while engine.has_unfinished():
        state = engine.stats()
        start = time.perf_counter()
        outputs = engine.step()
        end = time.perf_counter()
        produced = [o for o in outputs if o.new_token_ids]
        for o in outputs:
            if o.finish_reason not in (None, "length"):
                raise RuntimeError(f"request {o.request_id} finished with {o.finish_reason}: {o.error}")
            if o.new_token_ids:
                record.tokens(o.request_id, len(o.new_token_ids), end)
        decode_only = (not first_step and not state.waiting and not any(o.first_token for o in outputs)
                       and len(produced) == len(state.running))
        if decode_only:
            contexts = [r.context_tokens for r in state.running]
            tally.steps += 1
            tally.time_s += end - start
            tally.tokens += len(produced)
            tally.flops += decode_step_flops(shape, vocab, contexts, [r.rank for r in state.running])
            adapters = {r.adapter: r.rank for r in state.running if r.adapter}
            tally.bytes_read += decode_step_bytes(shape, vocab, contexts, list(adapters.values()))
        first_step = False
        record.progress()
    return tally
