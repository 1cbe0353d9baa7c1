"""`caraserve profile`: measure the engine's batched LoRA steps here and fit the perf model."""

from __future__ import annotations

import argparse
import json
import os
import sys

from launcher.cli import CliError
from shared.backends import BACKENDS
from shared.config import ConfigError, add_arguments, from_namespace


def register(subparsers) -> None:
    from services.gpu_worker.profiling.config import ProfileConfig

    p = subparsers.add_parser("profile", help="profile decode/prefill steps and fit the performance model")
    p.add_argument("--model", default="default", help="HF Llama directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--backend", default="bgmv", choices=BACKENDS, help="kernel family to profile")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0: one per core)")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--add-cold-starts", metavar="PROFILE", default=None,
                   help="measure only the cold starts and add them to this existing profile (made here, for this "
                        "model and backend); its decode and prefill samples and fits are kept")
    p.add_argument("--cpu-prefill", action="store_true",
                   help="also measure c, the tokens one CPU core handles within the device's per-layer prefill "
                        "time (CPU-assisted prefill's work split), into the profile's cpu_prefill section; an "
                        "--out profile made here for this model and backend only gains the section")
    add_arguments(p, ProfileConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.gpu_worker.engine_config import EngineConfig
    from services.gpu_worker.profiling.config import ProfileConfig
    from services.gpu_worker.profiling.cpu_prefill import measure_tokens_per_core
    from shared.model_store import ModelStoreError, resolve_model_dir
    from shared.perf_model import ProfileError

    try:
        config = from_namespace(ProfileConfig, args)
        engine_config = EngineConfig(backend=args.backend, dtype=args.dtype, device=args.device,
                                     max_batch_size=max(config.batch_sizes), kv_cache_bytes=1 << 30,
                                     num_threads=args.num_threads)
        model_dir = resolve_model_dir(None if args.model == "default" else args.model)
    except (ConfigError, ModelStoreError) as exc:
        raise CliError(str(exc)) from None

    stages: list[str] = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in stages:
            if stages:
                print(file=sys.stderr)  # a new stage starts on a new line
            stages.append(stage)
        print(f"\rprofiling {args.backend} {stage}: {done}/{total} grid points", end="", file=sys.stderr,
              flush=True)

    try:
        model = starting_profile(args, model_dir, engine_config, config, progress)
        if args.cpu_prefill:
            model = model.with_cpu_prefill(measure_tokens_per_core(model_dir, engine_config, progress=progress))
    except ProfileError as exc:
        raise CliError(str(exc)) from None
    print(file=sys.stderr)
    model.save(args.out)
    print(json.dumps(summary(args.out, model), indent=1))
    return 0


def starting_profile(args: argparse.Namespace, model_dir, engine_config, config, progress):
    """The profile before any cpu_prefill measurement: --add-cold-starts' profile with new cold starts
    (its cpu_prefill section kept); with --cpu-prefill, the --out profile when it was made here for this
    model; else a full profile."""
    from services.gpu_worker.profiling.profiler import add_cold_starts, profile
    from shared.perf_model import PerfModel

    if args.add_cold_starts:
        existing = PerfModel.load(args.add_cold_starts)
        return add_cold_starts(existing, model_dir, engine_config, config, progress).with_cpu_prefill(
            existing.cpu_prefill)
    if args.cpu_prefill:
        existing = profile_made_here(args.out, model_dir, engine_config)
        if existing is not None:
            return existing
    return profile(model_dir, engine_config, config, progress)


def profile_made_here(path: str, model_dir, engine_config):
    """The profile at ``path`` when it was made on this device for this model and backend, else None
    (no file, not a profile, or another model's: then a full profile replaces it)."""
    from services.gpu_worker.profiling.profiler import model_digest
    from shared.perf_model import PerfModel, ProfileError, current_device_name

    if not os.path.isfile(path):
        return None
    try:
        return PerfModel.load(path, expect_model_digest=model_digest(model_dir),
                              expect_device=current_device_name(engine_config.resolved_device()),
                              expect_backend=engine_config.backend)
    except ProfileError as exc:
        print(f"{exc}; profiling in full", file=sys.stderr)
        return None


def summary(out: str, model) -> dict:
    """What `caraserve profile` prints: where the profile went and how well each phase fits."""
    phases = {"decode": model.decode, "prefill": model.prefill,
              **{f"cold_{level}": cost for level, cost in model.cold_start.items()}}
    return {"out": out, "backend": model.info.backend, "device": model.info.device_name,
            "samples": len(model.samples), "cold_start_link": model.info.cold_start_link,
            **{name: {"terms": list(cost.terms), "r2_holdout": cost.r2_holdout} for name, cost in phases.items()},
            **({"cpu_prefill": model.cpu_prefill.to_dict()} if model.cpu_prefill else {})}
