"""`caraserve profile`: measure the engine's batched LoRA steps here and fit the perf model.

Without ``--out`` the profile goes to the profile cache (``~/.cache/caraserve/profiles/``),
where workers look for it at start: ``--backend auto`` (the default) makes one per kernel
family, and a full profile replaces the quick one (``--quick``) a worker made for itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from launcher.cli import CliError
from shared.backends import AUTO, BACKEND_CHOICES, BACKENDS
from shared.config import ConfigError, add_arguments, from_namespace


def register(subparsers) -> None:
    from services.gpu_worker.profiling.config import ProfileConfig

    p = subparsers.add_parser("profile", help="profile decode/prefill steps and fit the performance model")
    p.add_argument("--model", default="default", help="HF Llama directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--backend", default=AUTO, choices=BACKEND_CHOICES,
                   help="kernel family to profile; auto: both (into the profile cache)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-threads", type=int, default=0, help="torch CPU threads (0: one per core)")
    p.add_argument("--out", default="", help="profile JSON to write (default: the profile cache, with the "
                                             "cpu_prefill section, where workers find it)")
    p.add_argument("--quick", action="store_true",
                   help="the quick grid a worker runs at start (replaces the grid flags); marks the profile quick")
    p.add_argument("--if-missing", action="store_true",
                   help="into the cache: skip a family whose profile is already there (workers use this)")
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
        config = config.quick() if args.quick else config
        if args.out and args.backend == AUTO:
            raise ConfigError("--backend auto profiles both families into the profile cache; "
                              "give --backend bgmv or mbgmv with --out")
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
        print(f"\rprofiling {stage}: {done}/{total} grid points", end="", file=sys.stderr, flush=True)

    if not args.out:
        return into_cache(args, model_dir, engine_config, config, progress)
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


def into_cache(args: argparse.Namespace, model_dir, engine_config, config, progress) -> int:
    """Profile each asked family into the profile cache, with the cpu_prefill section; each
    family's key is locked meanwhile, so workers sharing this host wait instead of profiling too."""
    import contextlib

    from services.gpu_worker.profiling.cpu_prefill import measure_tokens_per_core
    from services.gpu_worker.profiling.profile_cache import ProfileKey, model_digest
    from services.gpu_worker.profiling.profiler import profile_backends
    from shared.perf_model import ProfileError, current_device_name

    device_name = current_device_name(engine_config.resolved_device())
    keys = {b: ProfileKey(model_digest(model_dir), device_name, engine_config.dtype, b)
            for b in (BACKENDS if args.backend == AUTO else (args.backend,))}
    with contextlib.ExitStack() as locks:
        for key in keys.values():  # always in BACKENDS order: no two makers deadlock
            locks.enter_context(key.lock())
        wanted = tuple(b for b, key in keys.items() if not (args.if_missing and key.load()))
        if not wanted:
            print(json.dumps({"cached": [str(key.path) for key in keys.values()]}, indent=1))
            return 0
        try:
            models = profile_backends(model_dir, engine_config, config, wanted, progress,
                                      grid="quick" if args.quick else "full")
            cpu = measure_tokens_per_core(model_dir, engine_config, progress=progress)
        except ProfileError as exc:
            raise CliError(str(exc)) from None
        print(file=sys.stderr)
        out = []
        for backend, model in models.items():
            model = model.with_cpu_prefill(cpu)
            model.save(keys[backend].path)
            out.append(summary(str(keys[backend].path), model))
    print(json.dumps(out, indent=1))
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
    from services.gpu_worker.profiling.profile_cache import model_digest
    from shared.perf_model import PerfModel, ProfileError, current_device_name

    if not os.path.isfile(path):
        return None
    try:
        return PerfModel.load(path, expect_model_digest=model_digest(model_dir),
                              expect_device=current_device_name(engine_config.resolved_device()),
                              expect_backend=engine_config.starting_backend())
    except ProfileError as exc:
        print(f"{exc}; profiling in full", file=sys.stderr)
        return None


def summary(out: str, model) -> dict:
    """What `caraserve profile` prints: where the profile went and how well each phase fits."""
    phases = {"decode": model.decode, "prefill": model.prefill,
              **{f"cold_{level}": cost for level, cost in model.cold_start.items()}}
    return {"out": out, "backend": model.info.backend, "grid": model.info.grid, "device": model.info.device_name,
            "samples": len(model.samples), "cold_start_link": model.info.cold_start_link,
            **{name: {"terms": list(cost.terms), "r2_holdout": cost.r2_holdout} for name, cost in phases.items()},
            **({"cpu_prefill": model.cpu_prefill.to_dict()} if model.cpu_prefill else {})}
