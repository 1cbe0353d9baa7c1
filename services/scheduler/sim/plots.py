"""Figures of simulation results (matplotlib, Agg backend): attainment vs load, TPT CDF,
and a per-group metric vs load for a fleet of several worker groups."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_attainment(ax, points: Mapping[str, Sequence[Mapping[str, float]]], title: str = "") -> None:
    """SLO attainment (%) against Poisson rate, one line per policy."""
    for name, series in points.items():
        rates = [p["rate"] for p in series]
        ax.plot(rates, [100.0 * p["slo_attainment"] for p in series], marker="o", label=name)
    ax.axhline(99.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("load (requests/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(title or "SLO attainment vs load")
    ax.legend(fontsize=7)


def plot_group_metric(ax, points: Mapping[str, Sequence[Mapping[str, float]]], key: str, title: str) -> None:
    """A per-group metric (``metrics.group_metrics`` key, e.g. ``group1_mean_rank``) against
    Poisson rate, one line per policy; points where it is undefined are left out."""
    for name, series in points.items():
        kept = [p for p in series if p.get(key) is not None and np.isfinite(p[key])]
        ax.plot([p["rate"] for p in kept], [p[key] for p in kept], marker=".", label=name)
    ax.set_xlabel("load (requests/s)")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.legend(fontsize=7)


def plot_attainment_bars(ax, attainment: Mapping[str, float]) -> None:
    names = list(attainment)
    ax.bar(range(len(names)), [100.0 * attainment[n] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=30, fontsize=7)
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title("SLO attainment")


def plot_tpt_cdf(ax, tpt: Mapping[str, np.ndarray], slo_ms: float) -> None:
    """Empirical CDF of time per token, one line per policy, the SLO marked."""
    from matplotlib.ticker import NullFormatter

    for name, values in tpt.items():
        x = np.sort(values)
        ax.plot(x, np.arange(1, len(x) + 1) / max(1, len(x)), label=name)
    ax.axvline(slo_ms, color="grey", linestyle=":", linewidth=1, label="SLO")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("time per token (ms)")
    ax.set_ylabel("CDF")
    ax.set_title("time per token")
    ax.legend(fontsize=7)


def save_simulation_figure(path: str | os.PathLike, tpt: Mapping[str, np.ndarray], slo_ms: float,
                           attainment: Mapping[str, float],
                           sweep: Mapping[str, Sequence[Mapping[str, float]]] | None = None) -> None:
    """Left: attainment vs load (or per policy without a sweep); right: TPT CDF."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    if sweep:
        plot_attainment(left, sweep)
    else:
        plot_attainment_bars(left, attainment)
    plot_tpt_cdf(right, tpt, slo_ms)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
