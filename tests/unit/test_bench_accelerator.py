"""The accelerator check's dry run on the CPU (the kernels part), and its refusal without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from bench.accelerator.benchmark import main, plot
from bench.accelerator.graphs import compare
from bench.accelerator.kernels import KernelCase, check, time_case


def test_dry_run_on_the_cpu_writes_the_report_and_plot(tmp_path):
    path = tmp_path / "accelerator-cpu.json"
    assert main(["--device", "cpu", "--quick", "--skip-engine", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["device"] == "cpu" and "engine" not in report
    assert report["decode_graphs"] == {"skipped": "no CUDA graphs on cpu"}
    assert all(c["pass"] for c in report["kernels"]["check"].values())
    assert [(r["fan_in"], r["fan_out"]) for r in report["kernels"]["timings"]] == [(576, 576), (576, 1536), (1536, 576)]
    assert path.with_suffix(".png").stat().st_size > 0


def test_the_check_catches_a_wrong_kernel(monkeypatch):
    import bench.accelerator.kernels as kernels

    def off_by_one(y, x, batch, use_native=True):
        y.add_(1.0)  # a "kernel" that adds the wrong delta

    monkeypatch.setattr(kernels, "mbgmv", off_by_one)
    assert not check("cpu")["mbgmv"]["pass"]


def test_timing_reports_both_paths_and_their_ratio():
    row = time_case(KernelCase(64, 48, 8, 4), "cpu", calls=2)
    for backend in ("bgmv", "mbgmv"):
        assert row[backend]["kernel_us"] > 0 and row[backend]["torch_us"] > 0
        assert row[backend]["speedup"] == pytest.approx(row[backend]["torch_us"] / row[backend]["kernel_us"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_refuses_and_measures_nothing(tmp_path, capsys):
    assert main(["--json", str(tmp_path / "x.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_graph_comparison_reports_rates_and_agreement(tiny_model_dir, tiny_adapters, tmp_path):
    """On a CPU both engines step eagerly (nothing is captured), so they agree exactly and no step replays;
    the rows and the plot's second panel are what a CUDA run fills."""
    report = compare("cpu", tiny_model_dir, dict(tiny_adapters), sizes=(1, 3), steps=2)
    for row, size in zip(report["rows"], (1, 3)):
        assert row["batch_size"] == size and row["same_tokens"] == 1.0
        assert row["first_step_logits_max_abs_diff"] == 0.0
        assert row["graphs"]["replayed_steps"] == 0 and row["eager"]["tokens_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["graphs"]["tokens_per_s"] / row["eager"]["tokens_per_s"])
    timings = [time_case(KernelCase(64, 48, 8, 4), "cpu", calls=1)]
    path = tmp_path / "plot.png"
    plot({"device": "cpu", "decode_graphs": report, "kernels": {"timings": timings, "kernel": "native"}}, path)
    assert path.stat().st_size > 0
