"""The engine benchmark's figure: throughput per configuration (with the target ratios) and latencies."""

from __future__ import annotations

from pathlib import Path

LATENCY_KEYS = ("p50", "p90", "p99", "mean")


def _throughput(ax, runs: dict, targets: dict) -> None:
    keys = list(runs)
    values = [runs[k]["tokens_per_s"] for k in keys]
    bars = ax.bar(keys, values, color=["C0" if runs[k]["system"] == "engine" else "C7" for k in keys])
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
    notes = []
    for t in targets.values():
        if t.get("ratio") is not None:
            verdict = "pass" if t["pass"] else "FAIL"
            notes.append(f"{t['name']}: {t['ratio']:.2f}x (target {t['target']}x) {verdict}")
    ax.set_title("useful output tokens/s", fontsize=10)
    ax.set_ylabel("tokens/s")
    ax.text(0.02, 0.98, "\n".join(notes), transform=ax.transAxes, va="top", fontsize=7,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    ax.set_ylim(0, max(values) * 1.45)


def _latency(ax, runs: dict, metric: str, title: str) -> None:
    keys = list(runs)
    width = 0.8 / len(LATENCY_KEYS)
    for i, stat in enumerate(LATENCY_KEYS):
        xs = [j + (i - (len(LATENCY_KEYS) - 1) / 2) * width for j in range(len(keys))]
        ax.bar(xs, [runs[k][metric][stat] * 1e3 for k in keys], width, label=stat)
    ax.set_xticks(range(len(keys)), keys)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_ylabel("ms")
    ax.legend(fontsize=7)


def plot_report(report: dict, path: Path) -> None:
    """Write the three-panel PNG for ``report`` (the benchmark's JSON) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    _throughput(axes[0], runs, report["targets"])
    _latency(axes[1], runs, "ttft_s", "time to first token")
    _latency(axes[2], runs, "tpot_s", "time per output token")
    legend = "   ".join(f"({k}) {r['label']}" for k, r in runs.items())
    load = report["load_avg"]
    fig.suptitle(f"engine benchmark on {report['device']} ({report['machine']['threads']} threads): "
                 f"{report['model']}, {report['workload']['num_requests']} requests, best of {report['repeats']} "
                 f"round(s); load average {load['start'][0]} -> {load['end'][0]}", fontsize=10)
    fig.text(0.5, 0.01, legend, ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
