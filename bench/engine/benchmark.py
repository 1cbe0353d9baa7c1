"""Engine benchmark: our multi-LoRA engine against transformers(+peft) and vLLM's CPU backend.

Runs seven configurations over the same requests (see bench/engine/configs.py), each in a fresh
process so its peak RSS is its own, and reports useful output tokens/s, TTFT and time per
output token percentiles, CPU use, peak RSS, the target ratios, and run (a)'s decode-only
steps as fractions of the bf16 matmul peak and of the memory bandwidth measured in the same run.

    python -m bench.engine                 # full workload (several minutes on 2 cores)
    python -m bench.engine --quick         # 8 short requests, a smoke run
    python -m bench.engine --skip-hf       # without the transformers baselines (d) and (e)
    python -m bench.engine --skip-vllm     # without the vLLM peer (f) and (g)
    python -m bench.engine --configs c,g   # only these configurations
    python -m bench.engine --repeats 2     # two rounds over all configurations, best round each

The vLLM configurations run under the vLLM venv's Python (``.venv-vllm``, made by ``make
bench``). When it is missing or vllm does not import there, the benchmark prints why, marks
(f) and (g) as skipped with that reason in the report's ``skipped``, and reports the rest.

On a CPU shared with other work, timings swing with the machine's load: every run records
the load average and its own CPU time (tokens per CPU second move much less than tokens
per second), and ``--repeats`` interleaves rounds so that each configuration reports its
least-disturbed round.

It prints the JSON report on stdout, writes ``bench/results/engine-<device>.json`` (or
``--json OUT``) and a PNG next to it, and shows progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from bench.engine.configs import (CONFIGS, DECODE_EFFICIENCY_CONFIG, HF_CONFIGS, VLLM_CONFIGS, make_spec,
                                  run_configuration)
from bench.engine.options import OMP_WAIT_POLICIES, RunOptions
from bench.engine.report import REFERENCE_TOKENS_PER_S, decode_efficiency, ratios, targets
from bench.engine.run_record import load_average
from bench.engine.vllm_peer import vllm_unavailable
from bench.engine.workload import BenchRequest, EngineWorkload, make_requests
from bench.paths import REPO, RESULTS
from shared.config import ConfigError, add_arguments, from_namespace

QUICK = {"num_requests": 8, "output_max": 32}


class BenchError(RuntimeError):
    """A benchmark run failed; the message says which and why."""


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device is available")
    return device


def device_label(device: str) -> str:
    """``cpu``, or the CUDA device's name made file-name safe (``nvidia-h100-80gb-hbm3``)."""
    if device == "cpu":
        return "cpu"
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def machine_info(device: str, threads: int) -> dict:
    import torch

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M)
        cpu = names[0] if names else cpu
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version()}
    if device != "cpu":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def child_env(omp_wait_policy: str) -> dict[str, str]:
    """The environment of a configuration's process: ours, plus OMP_WAIT_POLICY unless ``inherit``.

    On a CPU shared with other work, OpenMP threads that spin between parallel regions
    compete with the thread that has work, and every small op can stall for a scheduler
    time slice; ``passive`` makes idle threads sleep instead. Every configuration, the
    baselines included, gets the same setting.
    """
    env = dict(os.environ)
    if omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
    return env


def run_isolated(spec: dict, env: dict[str, str] | None = None, python: Path | None = None) -> dict:
    """Run one configuration in a fresh process of ``python`` (default ours); its stdout goes to our stderr."""
    with tempfile.TemporaryDirectory(prefix="caraserve-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        command = [str(python or sys.executable), "-m", "bench.engine.configs", str(spec_path), str(out_path)]
        proc = subprocess.run(command, cwd=REPO, stdout=sys.stderr, check=False, env=env)
        if proc.returncode != 0 or not out_path.is_file():
            raise BenchError(f"configuration ({spec['config']}) failed with exit status {proc.returncode}")
        return json.loads(out_path.read_text())


def best_of(results: list[dict]) -> dict:
    """The round with the highest tokens/s, plus every round's throughput and the largest peak RSS."""
    best = dict(max(results, key=lambda r: r["tokens_per_s"]))
    best["rounds"] = [{k: r[k] for k in ("tokens_per_s", "tokens_per_cpu_s", "wall_s", "load_avg_start")}
                      for r in results]
    best["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in results)
    return best


def vllm_python(options: RunOptions) -> Path:
    """The vLLM venv's Python (``options.vllm_python``, relative to the repository unless absolute)."""
    return REPO / options.vllm_python


def vllm_skips(options: RunOptions) -> dict[str, str]:
    """Requested vLLM configurations that cannot run, each with the reason (printed once on stderr)."""
    wanted = [k for k in options.configs if k in VLLM_CONFIGS]
    if not wanted:
        return {}
    if options.device != "cpu":
        reason = f"the vLLM peer is vLLM's CPU backend: it runs only with --device cpu, not {options.device}"
    else:
        reason = vllm_unavailable(vllm_python(options))
    if reason is None:
        return {}
    print(f"[bench] {reason}; skipping configuration(s) {', '.join(wanted)}", file=sys.stderr, flush=True)
    return {key: reason for key in wanted}


def _run_one(spec: dict, options: RunOptions, env: dict[str, str]) -> dict:
    """One round of one configuration; vLLM always runs in a fresh process of its venv's Python."""
    if spec["config"] in VLLM_CONFIGS:
        return run_isolated(spec, env, vllm_python(options))
    return run_isolated(spec, env) if options.isolate else run_configuration(spec)


def _run_rounds(specs: dict[str, dict], options: RunOptions, env: dict[str, str],
                skipped: dict[str, str]) -> dict[str, dict]:
    """Best round of every configuration; a failing vLLM configuration is added to ``skipped`` instead."""
    results: dict[str, list[dict]] = {key: [] for key in specs}
    for round_index in range(options.repeats):
        for key, spec in specs.items():
            if key in skipped:
                continue
            print(f"[bench] round {round_index + 1}/{options.repeats}: configuration ({key}) {CONFIGS[key].label}",
                  file=sys.stderr, flush=True)
            try:
                results[key].append(_run_one(spec, options, env))
            except BenchError as exc:
                if key not in VLLM_CONFIGS:
                    raise
                print(f"[bench] {exc}; skipping it", file=sys.stderr, flush=True)
                skipped[key] = str(exc)
    return {key: best_of(rounds) for key, rounds in results.items() if key not in skipped}


def run_benchmark(model_dir: Path, adapters: dict[str, Path], workload: EngineWorkload,
                  options: RunOptions | None = None, requests: list[BenchRequest] | None = None) -> dict:
    """Run the configurations over the workload and return the report (see module docstring).

    ``adapters`` maps the workload's adapter names to PEFT dirs; ``requests`` defaults to
    :func:`make_requests` for the model's vocabulary. With ``options.isolate`` off every
    configuration but vLLM's runs in this process (then peak RSS is this process's, cumulative).
    """
    options = options or RunOptions()
    config = json.loads((Path(model_dir) / "config.json").read_text())
    requests = requests or make_requests(workload, int(config["vocab_size"]))
    threads = options.resolved_threads()
    env = child_env(options.omp_wait_policy) if options.isolate else dict(os.environ)
    specs = {key: make_spec(key, model_dir, adapters, requests, options.device, threads, workload.hf_batch_size,
                            workload.step_tokens, options.peak_size, options.bandwidth_bytes)
             for key in options.configs}
    skipped = vllm_skips(options)
    load_start = load_average()
    runs = _run_rounds(specs, options, env, skipped)
    efficiency = decode_efficiency(runs.get(DECODE_EFFICIENCY_CONFIG))
    return {
        "bench": "engine", "device": device_label(options.device), "model": Path(model_dir).name,
        "machine": machine_info(options.device, threads), "isolated_processes": options.isolate,
        "repeats": options.repeats, "omp_wait_policy": env.get("OMP_WAIT_POLICY", "unset (runtime default)"),
        "load_avg": {"start": load_start, "end": load_average()},
        "workload": workload.to_dict(), "adapter_ranks": workload.adapter_ranks(),
        "runs": runs, "skipped": skipped, "ratios": ratios(runs), "targets": targets(runs, efficiency),
        "decode_efficiency": efficiency,
        "reference_tokens_per_s": REFERENCE_TOKENS_PER_S,
    }


def write_outputs(report: dict, json_path: Path) -> Path:
    """Write the JSON report and its PNG (same name, ``.png``); returns the PNG path."""
    from bench.engine.plot import plot_report

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png = json_path.with_suffix(".png")
    plot_report(report, png)
    return png


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 short requests: a smoke run")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to run")
    parser.add_argument("--json", type=Path, default=None,
                        help="report path (default bench/results/engine-<device>.json)")
    parser.add_argument("--skip-hf", action="store_true", help="skip the transformers baselines (d) and (e)")
    parser.add_argument("--skip-vllm", action="store_true", help="skip the vLLM CPU peer (f) and (g)")
    parser.add_argument("--model", type=Path, default=None, help="base model dir (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--configs", default="".join(CONFIGS), help="which configurations to run, e.g. 'ac' or 'f,g'")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all configurations; each reports its best")
    parser.add_argument("--omp-wait-policy", default=RunOptions.omp_wait_policy, choices=OMP_WAIT_POLICIES,
                        help="OMP_WAIT_POLICY of every configuration's process (inherit, the default: leave ours, "
                             "the runtime default a user gets)")
    add_arguments(parser, EngineWorkload)
    return parser.parse_args(argv)


def _workload(args: argparse.Namespace) -> EngineWorkload:
    workload = from_namespace(EngineWorkload, args)
    return replace(workload, **QUICK) if args.quick else workload


def _options(args: argparse.Namespace) -> RunOptions:
    wanted = set(args.configs.replace(",", "").replace(" ", ""))
    unknown = wanted - set(CONFIGS)
    if unknown:
        raise BenchError(f"--configs: unknown configuration(s) {''.join(sorted(unknown))}")
    skip = set(HF_CONFIGS if args.skip_hf else ()) | set(VLLM_CONFIGS if args.skip_vllm else ())
    configs = tuple(k for k in CONFIGS if k in wanted and k not in skip)
    if not configs:
        raise BenchError("no configuration left to run (check --configs, --skip-hf and --skip-vllm)")
    return RunOptions(device=resolve_device(args.device), configs=configs, repeats=args.repeats,
                      omp_wait_policy=args.omp_wait_policy)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        workload, options = _workload(args), _options(args)
        from bench.engine.adapters import ensure_bench_adapters
        from shared.model_store import default_model_dir

        model_dir = args.model or default_model_dir()
        adapters = ensure_bench_adapters(model_dir, workload.adapter_ranks(), workload.seed)
        report = run_benchmark(model_dir, adapters, workload, options)
    except (BenchError, ConfigError) as exc:
        print(f"bench.engine: {exc}", file=sys.stderr)
        return 1
    report["quick"] = args.quick
    suffix = "-quick" if args.quick else ""
    json_path = args.json or RESULTS / f"engine-{report['device']}{suffix}.json"
    png = write_outputs(report, json_path)
    print(json.dumps(report, indent=2))
    print(f"[bench] wrote {json_path} and {png}", file=sys.stderr)
    return 0

