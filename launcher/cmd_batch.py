"""`caraserve batch`: run a JSONL file of requests through one engine, offline.

Input line:  {"id", "prompt" | "prompt_token_ids", "adapter": name|null, "max_tokens",
              "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos"}
Output line: {"id", "token_ids", "text", "finish_reason": "length"|"stop"|"error", "error"?,
              "prefill_lora": {"cpu_layers", "device_layers", "waited_ms"}}

All requests go through one engine in mixed continuous batches. A bad line yields an
error line for its id and the rest still complete; outputs keep the input order.
``prefill_lora`` says how a request's prefill got its LoRA deltas: layers computed by the
CPU prefill pool, layers computed on the device, and how long it waited for its adapter.

``--cold-start`` (default ``cached``: every adapter loaded before the first request)
picks the residency mode; ``cpu_assist`` starts a CPU prefill pool of
``--cpu-prefill-workers`` processes for this run. On a CPU-only host the host-to-device
link is EMULATED with ``--emulate-link-gbps`` / ``--emulate-link-latency-ms``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from launcher.cli import CliError
from shared.config import ConfigError, add_arguments, from_namespace

SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos")
LINE_KEYS = {"id", "prompt", "prompt_token_ids", "adapter", *SAMPLING_KEYS}


def register(subparsers) -> None:
    from services.gpu_worker.engine_config import EngineConfig
    from services.gpu_worker.residency.config import ResidencyConfig

    p = subparsers.add_parser("batch", help="run a JSONL file of requests offline")
    p.add_argument("--model", default="default", help="HF Llama directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a PEFT adapter (repeatable)")
    add_arguments(p, EngineConfig)
    add_arguments(p, ResidencyConfig)
    p.set_defaults(cold_start="cached")
    p.add_argument("input", type=Path, help="input JSONL")
    p.add_argument("output", type=Path, help="output JSONL")
    p.set_defaults(func=run)


def parse_adapters(specs: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CliError(f"--adapter expects NAME=DIR, got {spec!r}")
        if name in adapters:
            raise CliError(f"adapter {name!r} given twice")
        adapters[name] = path
    return adapters


def build_engine(args: argparse.Namespace):
    """Load model and adapters; every failure becomes a one-line CliError."""
    from services.gpu_worker.engine import LLMEngine
    from services.gpu_worker.engine_config import EngineConfig
    from services.gpu_worker.model import ModelLoadError
    from services.gpu_worker.residency.config import ResidencyConfig
    from shared.model_store import ModelStoreError, resolve_model_dir
    from shared.peft_adapter import AdapterError
    from shared.tokenizer import TokenizerError

    try:
        config = from_namespace(EngineConfig, args)
        if config.resolved_device() == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise CliError("--device cuda requested but CUDA is not available")
        residency = from_namespace(ResidencyConfig, args)
        model_dir = resolve_model_dir(None if args.model == "default" else args.model)
        return LLMEngine(model_dir, config, parse_adapters(args.adapter), residency)
    except (ConfigError, ModelStoreError, ModelLoadError, AdapterError, TokenizerError) as exc:
        raise CliError(str(exc)) from None


def parse_line(raw: str, number: int, tokenizer) -> tuple[str, object]:
    """Return (id, EngineRequest) or (id, error message) for one input line."""
    from services.gpu_worker.request import EngineRequest, RequestError, SamplingParams

    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        return f"line-{number}", f"invalid JSON: {exc.msg}"
    if not isinstance(obj, dict):
        return f"line-{number}", "each line must be a JSON object"
    rid = str(obj.get("id", f"line-{number}"))
    unknown = sorted(set(obj) - LINE_KEYS)
    if unknown:
        return rid, f"unknown field(s): {', '.join(unknown)}"
    try:
        ids = _prompt_ids(obj, tokenizer)
        params = SamplingParams(**{k: obj[k] for k in SAMPLING_KEYS if obj.get(k) is not None})
    except (RequestError, TypeError) as exc:
        return rid, str(exc)
    adapter = obj.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        return rid, "adapter must be a string or null"
    return rid, EngineRequest(rid, ids, adapter, params)


def _prompt_ids(obj: dict, tokenizer) -> list[int]:
    from services.gpu_worker.request import RequestError

    if ("prompt" in obj) == ("prompt_token_ids" in obj):
        raise RequestError("exactly one of prompt or prompt_token_ids is required")
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise RequestError("prompt must be a string")
        return tokenizer(obj["prompt"])["input_ids"]
    ids = obj["prompt_token_ids"]
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RequestError("prompt_token_ids must be a list of integers")
    return ids


def run_requests(engine, lines: list[str]) -> list[dict]:
    """Submit every line, step the engine to completion, return output records in input order."""
    from services.gpu_worker.request import RequestError

    records: dict[int, dict] = {}
    slot_of: dict[str, int] = {}
    for n, raw in enumerate(lines):
        rid, parsed = parse_line(raw, n + 1, engine.tokenizer)
        if isinstance(parsed, str) or rid in slot_of:
            records[n] = error_record(rid, parsed if isinstance(parsed, str) else f"duplicate id {rid!r}")
            continue
        try:
            engine.add_request(parsed)
        except RequestError as exc:
            records[n] = error_record(rid, str(exc))
            continue
        slot_of[rid] = n
        records[n] = {"id": rid, "token_ids": [], "text": "", "finish_reason": None,
                      "prefill_lora": prefill_lora_record(None)}
    total = len(slot_of)
    done = 0
    while engine.has_unfinished():
        outputs = engine.step()
        if engine.idle and not outputs:
            engine.wait_for_work(0.01)  # adapters are loading
        for out in outputs:
            rec = records[slot_of[out.request_id]]
            rec["token_ids"] += out.new_token_ids
            rec["text"] += out.text_delta
            if out.first_token:
                rec["prefill_lora"] = prefill_lora_record(out.prefill_lora)
            if out.finished:
                rec["finish_reason"] = out.finish_reason
                if out.error:
                    rec["error"] = out.error
                done += 1
                print(f"\r{done}/{total} requests done", end="", file=sys.stderr, flush=True)
    if total:
        print(file=sys.stderr)
    return [records[n] for n in range(len(lines))]


def prefill_lora_record(lora) -> dict:
    """The ``prefill_lora`` field of an output line (zeros before a first token)."""
    if lora is None:
        return {"cpu_layers": 0, "device_layers": 0, "waited_ms": 0.0}
    return {"cpu_layers": lora.cpu_layers, "device_layers": lora.device_layers, "waited_ms": round(lora.waited_ms, 3)}


def error_record(rid: str, message: str) -> dict:
    return {"id": rid, "token_ids": [], "text": "", "finish_reason": "error", "error": message,
            "prefill_lora": prefill_lora_record(None)}


def run(args: argparse.Namespace) -> int:
    try:
        lines = [ln for ln in args.input.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"cannot read {args.input}: {exc}") from None
    engine = build_engine(args)
    report = engine.residency.report()
    if report.link_emulated:
        print(f"EMULATED host-to-device link: {report.link_gbps or 'unlimited'} GB/s, {report.link_latency_ms:g} ms "
              "per adapter load (emulation, not hardware)", file=sys.stderr)
    try:
        if engine.pool is None:
            records = run_requests(engine, lines)
        else:
            from launcher.local_pool import LocalPool

            with LocalPool(engine.pool):
                records = run_requests(engine, lines)
    finally:
        engine.close()
    try:
        args.output.write_text("".join(json.dumps(r) + "\n" for r in records))
    except OSError as exc:
        raise CliError(f"cannot write {args.output}: {exc}") from None
    return 0
