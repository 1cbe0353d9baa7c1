"""The engine benchmark's figure: throughput per configuration (with the targets) and latencies."""

from __future__ import annotations

from pathlib import Path

LATENCY_KEYS = ("p50", "p90", "p99", "mean")
SYSTEM_COLORS = {"engine": "C0", "hf": "C7", "vllm": "C3"}
SKIP_REASON_CHARS = 90


def _verdict(target: dict) -> str:
    return {True: "pass", False: "FAIL", None: "not run"}[target["pass"]]


def target_notes(targets: dict) -> list[str]:
    """One line per target: its measured ratio or value, the target and the verdict."""
    notes = []
    for t in targets.values():
        if "ratio" in t:
            shown = f"{t['ratio']:.2f}x" if t["ratio"] is not None else "-"
            notes.append(f"{t['name']}: {shown} (target {t['target']}x) {_verdict(t)}")
        elif isinstance(t["value"], dict):
            shown = " / ".join(f"{v:.0%}" if v is not None else "-" for v in t["value"].values())
            wanted = " or ".join(f"{v:.0%}" for v in t["target"].values())
            notes.append(f"decode, of peak / of bandwidth: {shown} (target {wanted}) {_verdict(t)}")
        elif "max_gib" in t:
            shown = f"{t['max_gib']:.2f} GiB" if t["max_gib"] is not None else "-"
            notes.append(f"engine peak RSS: {shown} (limit {t['target'] / 1024 ** 3:.0f} GiB) {_verdict(t)}")
        else:
            shown = f"{t['value']:.2f}" if t["value"] is not None else "-"
            notes.append(f"engine CPU use: {shown} cores (target {t['target']}) {_verdict(t)}")
    return notes


def _throughput(ax, runs: dict, targets: dict) -> None:
    keys = list(runs)
    values = [runs[k]["tokens_per_s"] for k in keys]
    bars = ax.bar(keys, values, color=[SYSTEM_COLORS[runs[k]["system"]] for k in keys])
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
    notes = target_notes(targets)
    ax.set_title("useful output tokens/s", fontsize=10)
    ax.set_ylabel("tokens/s")
    ax.text(0.02, 0.98, "\n".join(notes), transform=ax.transAxes, va="top", fontsize=7,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
    ax.set_ylim(0, max(values) * 1.7)


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
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), gridspec_kw={"width_ratios": (1.4, 1, 1)})
    _throughput(axes[0], runs, report["targets"])
    _latency(axes[1], runs, "ttft_s", "time to first token")
    _latency(axes[2], runs, "tpot_s", "time per output token")
    labels = [f"({k}) {r['label']}" for k, r in runs.items()]
    labels += [f"({k}) skipped: {reason[:SKIP_REASON_CHARS]}" for k, reason in report.get("skipped", {}).items()]
    legend = "\n".join("   ".join(labels[i:i + 4]) for i in range(0, len(labels), 4))
    load = report["load_avg"]
    fig.suptitle(f"engine benchmark on {report['device']} ({report['machine']['threads']} threads): "
                 f"{report['model']}, {report['workload']['num_requests']} requests, best of {report['repeats']} "
                 f"round(s); load average {load['start'][0]} -> {load['end'][0]}", fontsize=10)
    fig.text(0.5, 0.01, legend, ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.02 + 0.025 * (legend.count("\n") + 1), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
