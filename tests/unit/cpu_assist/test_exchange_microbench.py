"""The exchange microbench runs on a real ring and pool and reports both pool sizes."""

from __future__ import annotations

import pytest

from bench.cold_start.exchange_microbench import run_microbench
from shared.llama_shape import LlamaShape

SHAPE = LlamaShape(num_layers=2, hidden_size=16, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4)


@pytest.mark.timeout(420)
def test_the_exchange_microbench_reports_both_pool_sizes():
    report = run_microbench(SHAPE, rank=4, lengths=(8, 32), repeats=4)
    for row in report["by_prompt_length"].values():
        assert row["one_process_ms"] > 0 and row["two_processes_ms"] > 0 and row["compute_ms"] > 0
        one, two = row["one_process_ms"], row["two_processes_ms"]  # each rounded to 3 decimals, as the speedup
        rounding = 5e-4 / one + 5e-4 / two  # the relative error the rounding can put in one / two
        assert row["speedup_2_vs_1"] == pytest.approx(one / two, rel=rounding + 1e-3, abs=2e-3)
