"""One short run on a lent accelerator: the LoRA kernels checked and timed, then the engine bench there.

    python -m bench.accelerator                 # on a CUDA machine: everything, ~5 minutes
    python -m bench.accelerator --quick         # fewer timing calls, the engine bench's smoke workload
    python -m bench.accelerator --device cpu --quick --skip-engine   # checks this script on a CPU

1. The Triton shrink/expand kernels (the C++ kernel on a CPU) against the plain-torch reference:
   mixed ranks, rank 1, an adapter without weights, tokens without an adapter; BGMV and MBGMV.
2. The same kernels timed against the torch path they replace, at SmolLM2-135M's projection
   shapes with 64 decode tokens over 16 adapters (ranks 8/16/32/64): µs per call and the ratio.
3. Decode steps replayed as CUDA graphs against the same steps run eagerly (graphs.py): tokens/s
   per batch size, their ratio and how the two agree. Skipped on a CPU, which captures nothing.
4. ``python -m bench.engine --configs abc --skip-hf --skip-vllm`` on the device (its own JSON
   and PNG, ``accelerator-<device>-engine``), whose throughputs are copied in.

Writes ``bench/results/accelerator-<device>.json`` and ``.png``, the device named in both.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from bench.accelerator.graphs import compare
from bench.accelerator.kernels import TIMED_SHAPES, KernelCase, check, time_case
from bench.engine.benchmark import BenchError, device_label, machine_info, resolve_device
from bench.paths import REPO, RESULTS

DECODE_TOKENS, ADAPTERS = 64, 16


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.accelerator", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="where to run (cpu: a dry run)")
    parser.add_argument("--quick", action="store_true", help="fewer timing calls, the engine bench's smoke workload")
    parser.add_argument("--skip-engine", action="store_true", help="kernels only")
    parser.add_argument("--json", type=Path, default=None,
                        help="report path (default bench/results/accelerator-<device>.json)")
    return parser.parse_args(argv)


def run_kernels(device: str, calls: int) -> dict:
    """Part 1 and 2: the correctness check, then one timed row per projection shape."""
    print(f"[accelerator] checking the LoRA kernels on {device}", flush=True)
    checked = check(device)
    rows = []
    for fan_in, fan_out in TIMED_SHAPES:
        print(f"[accelerator] timing {fan_in} -> {fan_out}, {DECODE_TOKENS} tokens, {ADAPTERS} adapters", flush=True)
        rows.append(time_case(KernelCase(fan_in, fan_out, DECODE_TOKENS, ADAPTERS), device, calls))
    return {"kernel": "triton" if device == "cuda" else "native C++ (csrc/lora_cpu.cpp)", "check": checked,
            "timings": rows}


def run_graphs(device: str, quick: bool) -> dict:
    """Part 3, on the engine bench's model and adapters."""
    if device != "cuda":
        return {"skipped": f"no CUDA graphs on {device}"}
    from bench.engine.adapters import ensure_bench_adapters
    from bench.engine.workload import EngineWorkload
    from shared.model_store import default_model_dir

    workload, model_dir = EngineWorkload(), default_model_dir()
    adapters = ensure_bench_adapters(model_dir, workload.adapter_ranks(), workload.seed)
    sizes, steps = ((1, 16), 8) if quick else ((1, 8, 32, 64), 32)
    print(f"[accelerator] decode graphs against eager steps, batch sizes {sizes}", flush=True)
    return compare(device, model_dir, adapters, sizes, steps)


def run_engine(device: str, quick: bool, path: Path) -> dict:
    """Part 4: the engine bench's configurations (a), (b), (c) on the device, in a child process
    writing its own report to ``path`` (next to this one, so a dry run never replaces engine-cpu.json)."""
    cmd = [sys.executable, "-m", "bench.engine", "--device", device, "--configs", "abc", "--skip-hf",
           "--skip-vllm", "--json", str(path)] + (["--quick"] if quick else [])
    print(f"[accelerator] {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    runs = json.loads(path.read_text())["runs"]
    return {"report": path.name,
            "tokens_per_s": {key: run["tokens_per_s"] for key, run in runs.items()}}


def plot(report: dict, path: Path) -> None:
    """Kernel against torch path, µs per call (log scale); beside it, when they ran, decode tokens/s
    of graph replay against eager steps per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graph_rows = report["decode_graphs"].get("rows", [])
    fig, axes = plt.subplots(1, 2 if graph_rows else 1, figsize=(15 if graph_rows else 9, 4.5), squeeze=False)
    _plot_kernels(axes[0][0], report)
    if graph_rows:
        _plot_graphs(axes[0][1], graph_rows, report["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_kernels(ax, report: dict) -> None:
    rows = report["kernels"]["timings"]
    labels = [f"{r['fan_in']}→{r['fan_out']}\n{b}" for r in rows for b in ("bgmv", "mbgmv")]
    kernel = [r[b]["kernel_us"] for r in rows for b in ("bgmv", "mbgmv")]
    torch_path = [r[b]["torch_us"] for r in rows for b in ("bgmv", "mbgmv")]
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], torch_path, 0.4, label="torch path")
    ax.bar([x + 0.2 for x in xs], kernel, 0.4, label=report["kernels"]["kernel"])
    ax.set_xticks(list(xs), labels)
    ax.set_yscale("log")
    ax.set_ylabel("µs per call (lower is better)")
    ax.set_title(f"Multi-LoRA kernels, {DECODE_TOKENS} decode tokens, {ADAPTERS} adapters — {report['device']}")
    ax.legend()


def _plot_graphs(ax, rows: list[dict], device: str) -> None:
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["eager"]["tokens_per_s"] for r in rows], 0.4, label="eager steps")
    ax.bar([x + 0.2 for x in xs], [r["graphs"]["tokens_per_s"] for r in rows], 0.4, label="CUDA graph replay")
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['speedup']:.2f}x", (x + 0.2, r["graphs"]["tokens_per_s"]), ha="center", va="bottom")
    ax.set_xticks(list(xs), [f"batch {r['batch_size']}" for r in rows])
    ax.set_ylabel("decode tokens/s (higher is better)")
    ax.set_title(f"Decode steps, half the requests on adapters — {device}")
    ax.legend()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except BenchError as exc:
        print(f"[accelerator] {exc}: run this on a lent accelerator (or with --device cpu to check the script)",
              file=sys.stderr)
        return 2
    label = device_label(device)
    report = {"bench": "accelerator", "device": label, "machine": machine_info(device, torch.get_num_threads()),
              "kernels": run_kernels(device, 20 if args.quick else 200)}
    report["decode_graphs"] = run_graphs(device, args.quick)
    path = args.json or RESULTS / f"accelerator-{label}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_engine:
        report["engine"] = run_engine(device, args.quick, path.with_name(f"{path.stem}-engine.json"))
    path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, path.with_suffix(".png"))
    for row in report["kernels"]["timings"]:
        print(f"[accelerator] {row['fan_in']}->{row['fan_out']}: " + ", ".join(
            f"{b} {row[b]['kernel_us']:.1f} us vs torch {row[b]['torch_us']:.1f} us ({row[b]['speedup']:.2f}x)"
            for b in ("bgmv", "mbgmv")))
    print(f"[accelerator] check: {json.dumps(report['kernels']['check'])}")
    print(f"[accelerator] wrote {path} and {path.with_suffix('.png')}")
    graphs_agree = all(row["same_tokens"] > 0 for row in report["decode_graphs"].get("rows", []))
    return 0 if all(c["pass"] for c in report["kernels"]["check"].values()) and graphs_agree else 1
