"""Decode steps replayed as CUDA graphs against the same steps run eagerly, in one process.

For each batch size, two engines on the engine bench's model and adapters (one with
``cuda_graphs`` on, one off) serve the same requests: ``size`` greedy requests of 32 prompt tokens
and ``steps + 1`` new tokens, every other one on an adapter (ranks 8-64), the rest on the base
model. Each engine serves them twice: an untimed round (the graphs are captured there, on first
use) and a timed one, whose decode steps (every step after the prefill) give tokens per second.

Reported per size: both rates, their ratio, how many steps replayed a graph, and how the two
engines agree: the share of requests with identical greedy tokens (the graphs attend with the
Triton kernel, the eager steps with the gathered SDPA path, so bf16 rounding may flip a near tie)
and the largest logits difference of the first decode step.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from services.gpu_worker.engine import LLMEngine
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.request import EngineRequest, SamplingParams

PROMPT_TOKENS = 32


def _requests(size: int, steps: int, adapters: list[str], vocab: int) -> list[EngineRequest]:
    gen = torch.Generator().manual_seed(size)
    return [EngineRequest(f"g{i}", torch.randint(3, vocab, (PROMPT_TOKENS,), generator=gen).tolist(),
                          adapters[i // 2 % len(adapters)] if i % 2 else None,
                          SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True))
            for i in range(size)]


def _serve(engine: LLMEngine, requests: list[EngineRequest]) -> tuple[float, int, dict[str, list[int]], dict]:
    """Decode seconds, decode tokens, each request's ids and the first decode step's logits by request."""
    for r in requests:
        engine.add_request(r)
    ids: dict[str, list[int]] = {r.request_id: [] for r in requests}
    first_decode: dict[str, torch.Tensor] = {}
    engine.step()  # the prefill (every request fits one step)
    sync = torch.cuda.synchronize if engine.model.device.type == "cuda" else (lambda: None)
    sync()
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished():
        for out in engine.step():
            ids[out.request_id] += out.new_token_ids
            tokens += len(out.new_token_ids)
            if out.logits is not None and out.request_id not in first_decode:
                first_decode[out.request_id] = out.logits
    sync()
    return time.perf_counter() - start, tokens, ids, first_decode


def compare(device: str, model_dir: Path, adapters: dict[str, Path], sizes: tuple[int, ...], steps: int) -> dict:
    """One row per batch size (see the module docstring)."""
    engines = {graphs: LLMEngine(model_dir, EngineConfig(device=device, dtype="bfloat16", backend="mbgmv",
                                                          max_batch_size=max(sizes), cuda_graphs=graphs),
                                 dict(adapters))
               for graphs in (False, True)}
    vocab, names = engines[False].model.config.vocab_size, sorted(adapters)
    rows = []
    for size in sizes:
        row: dict = {"batch_size": size, "decode_steps": steps}
        results = {}
        for graphs, engine in engines.items():
            engine.record_logits = True
            _serve(engine, _requests(size, steps, names, vocab))  # untimed: captures this size's graphs
            replays = engine.runner.graphs.replays if engine.runner.graphs else 0
            seconds, tokens, ids, logits = _serve(engine, _requests(size, steps, names, vocab))
            results[graphs] = (ids, logits)
            key = "graphs" if graphs else "eager"
            row[key] = {"tokens_per_s": tokens / seconds, "step_ms": 1e3 * seconds / steps,
                        "replayed_steps": (engine.runner.graphs.replays - replays) if engine.runner.graphs else 0}
        row["speedup"] = row["graphs"]["tokens_per_s"] / row["eager"]["tokens_per_s"]
        (eager_ids, eager_logits), (graph_ids, graph_logits) = results[False], results[True]
        row["same_tokens"] = sum(eager_ids[k] == graph_ids[k] for k in eager_ids) / size
        row["first_step_logits_max_abs_diff"] = max((eager_logits[k] - graph_logits[k]).abs().max().item()
                                                    for k in eager_logits)
        print(f"[accelerator] decode graphs, batch {size}: {row['graphs']['tokens_per_s']:.0f} against eager "
              f"{row['eager']['tokens_per_s']:.0f} tokens/s ({row['speedup']:.2f}x), same tokens "
              f"{row['same_tokens']:.2f}", flush=True)
        rows.append(row)
    return {"rows": rows}
