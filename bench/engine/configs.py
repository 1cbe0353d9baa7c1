"""The seven configurations of the engine benchmark and how one of them is run.

A run is described by a JSON spec (plain data, so it can cross a process boundary) and
answers a JSON result. :func:`run_configuration` runs one in this process;
``python -m bench.engine.configs SPEC.json RESULT.json`` runs one in a fresh process, so
that its peak RSS is its own. The vLLM configurations (system ``vllm``) always run that way,
under the vLLM venv's Python: this module and the modules it imports at the top must
therefore import only the standard library and other such plain bench/shared modules.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.engine.metrics import matmul_peak, memory_bandwidth
from bench.engine.workload import BenchRequest
from bench.engine.run_record import load_average, peak_rss_bytes


@dataclass(frozen=True)
class BenchConfig:
    """One column of the benchmark."""

    key: str
    label: str
    system: str  # "engine", "hf" or "vllm"
    adapters: bool
    backend: str = "bgmv"


CONFIGS: dict[str, BenchConfig] = {c.key: c for c in (
    BenchConfig("a", "engine, mixed adapters, bgmv", "engine", True, "bgmv"),
    BenchConfig("b", "engine, mixed adapters, mbgmv", "engine", True, "mbgmv"),
    BenchConfig("c", "engine, base model only", "engine", False),
    BenchConfig("d", "transformers+peft generate, adapter_names", "hf", True),
    BenchConfig("e", "transformers generate, base model only", "hf", False),
    BenchConfig("f", "vLLM CPU, mixed adapters", "vllm", True),
    BenchConfig("g", "vLLM CPU, base model only", "vllm", False),
)}
HF_CONFIGS = tuple(k for k, c in CONFIGS.items() if c.system == "hf")
VLLM_CONFIGS = tuple(k for k, c in CONFIGS.items() if c.system == "vllm")
DECODE_EFFICIENCY_CONFIG = "a"


def make_spec(key: str, model_dir: Path, adapters: dict[str, Path], requests: list[BenchRequest], device: str,
              threads: int, hf_batch_size: int, step_tokens: int, peak_size: int | None = None,
              bandwidth_bytes: int | None = None) -> dict:
    """The JSON-able description of one run."""
    if key not in CONFIGS:
        raise ValueError(f"unknown configuration {key!r}; choose from {', '.join(CONFIGS)}")
    return {"config": key, "model_dir": str(model_dir), "adapters": {n: str(p) for n, p in adapters.items()},
            "requests": [r.to_dict() for r in requests], "device": device, "threads": threads,
            "hf_batch_size": hf_batch_size, "step_tokens": step_tokens, "peak_size": peak_size,
            "bandwidth_bytes": bandwidth_bytes}


def run_configuration(spec: dict) -> dict:
    """Run the configuration ``spec`` describes; returns its result (see module docstring)."""
    config = CONFIGS[spec["config"]]
    model_dir = Path(spec["model_dir"])
    requests = [BenchRequest.from_dict(r) for r in spec["requests"]]
    adapters = {n: Path(p) for n, p in spec["adapters"].items()} if config.adapters else None
    label = f"({config.key}) {config.label}"
    start_load = load_average()
    decode = peer = None
    if config.system == "engine":
        from bench.engine.engine_runner import run_engine

        record, tally = run_engine(model_dir, requests, adapters, config.backend, spec["device"], spec["threads"],
                                   spec["step_tokens"], label)
        decode = tally.to_dict()
    elif config.system == "vllm":
        from bench.engine.vllm_runner import run_vllm

        record, peer = run_vllm(model_dir, requests, adapters, spec["threads"], spec["step_tokens"], label)
    else:
        from bench.engine.hf_runner import run_hf

        record = run_hf(model_dir, requests, adapters, spec["device"], spec["threads"], spec["hf_batch_size"], label)
    result = {"config": config.key, "label": config.label, "system": config.system, **record.summary(),
              "peak_rss_bytes": peak_rss_bytes(),
              "load_avg_start": start_load, "load_avg_end": load_average()}
    if decode is not None:
        result["decode"] = decode
    if peer is not None:
        result["vllm"] = peer
    if config.key == DECODE_EFFICIENCY_CONFIG:
        result["matmul_peak"] = matmul_peak(spec["device"], spec.get("peak_size") or None)
        result["memory_bandwidth"] = memory_bandwidth(spec["device"], spec.get("bandwidth_bytes") or None)
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.engine.configs SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    Path(args[1]).write_text(json.dumps(run_configuration(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
