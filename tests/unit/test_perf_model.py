"""The performance model: fitting, held-out R^2, profile files, incremental batch stats."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from shared.batch_stats import BatchStats, BatchStatsError
from shared.perf_model import (SCHEMA, LinearCost, PerfModel, ProfileError, ProfileInfo, ProfileMismatchError,
                               fit_linear, sample_stats)

TRUE_DECODE = {"const": 5000.0, "requests": 120.0, "batch_max_rank": 2.0, "tokens": 0.5, "adapters": 60.0}


def _decode_samples(truth: dict[str, float], n: int, noise: float, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    cost = LinearCost.from_mapping(truth)
    samples = []
    for _ in range(n):
        batch = int(rng.integers(1, 65))
        pool = [8, 16, 32, 64] if rng.random() < 0.5 else [int(rng.choice([8, 16, 32, 64]))]  # mixed or not
        ranks = rng.choice(pool, size=batch).tolist()
        tokens = rng.integers(16, 2048, size=batch).tolist()
        adapters = [f"r{rank}-{rng.integers(0, 6)}" for rank in ranks]  # requests share adapters
        clean = cost.cost(sample_stats({"ranks": ranks, "tokens": tokens, "adapters": adapters}))
        samples.append({"phase": "decode", "ranks": ranks, "tokens": tokens, "adapters": adapters,
                        "latency_us": clean * (1 + noise * rng.standard_normal())})
    return samples


def _prefill_samples(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    cost = LinearCost.from_mapping({"const": 3000.0, "tokens": 40.0, "tokens_max_rank": 0.2, "tokens_sq": 0.01})
    samples = []
    for _ in range(n):
        batch = int(rng.integers(1, 5))
        ranks = rng.choice([8, 16, 32, 64], size=batch).tolist()
        tokens = rng.integers(16, 1024, size=batch).tolist()
        clean = cost.cost(sample_stats({"ranks": ranks, "tokens": tokens}))
        samples.append({"phase": "prefill", "ranks": ranks, "tokens": tokens,
                        "latency_us": clean * (1 + 0.01 * rng.standard_normal())})
    return samples


def _fitted(backend: str = "bgmv", **info) -> PerfModel:
    samples = _decode_samples(TRUE_DECODE, 300, 0.01, 1) + _prefill_samples(120, 2)
    return PerfModel.fit(samples, ProfileInfo(backend=backend, **info))


def test_fit_recovers_known_coefficients_from_noisy_samples():
    model = _fitted()
    for term, value in TRUE_DECODE.items():
        assert model.decode.coefficient(term) == pytest.approx(value, rel=0.15), term
    assert model.decode.r2_holdout > 0.97
    assert model.decode.n_holdout == model.decode.n_train == 300  # 4-fold: every sample held out once
    assert model.prefill.r2_holdout > 0.97


def test_holdout_r2_is_measured_on_unseen_points():
    rng = np.random.default_rng(3)
    stats = [sample_stats({"ranks": [8] * int(b)}) for b in rng.integers(1, 64, size=200)]
    noise_only = fit_linear(stats, rng.normal(1000.0, 50.0, size=200).tolist(), ("const", "requests"))
    assert noise_only.r2_holdout < 0.2
    exact = fit_linear(stats, [100.0 + 7.0 * s.count for s in stats], ("const", "requests"))
    assert exact.r2_holdout == pytest.approx(1.0)
    assert exact.coefficient("requests") == pytest.approx(7.0)


def test_holdout_r2_sees_an_outlier_that_the_fit_absorbs():
    stats = [sample_stats({"ranks": [8] * b}) for b in range(1, 41)]
    latency = [100.0 + 7.0 * s.count for s in stats]
    latency[17] += 400.0  # one bad timing: the training fit bends to it, its held-out prediction does not
    fit = fit_linear(stats, latency, ("const", "requests"))
    assert fit.r2_holdout < fit.r2_train < 1.0


def test_negative_terms_are_dropped_so_costs_grow_with_load():
    stats = [sample_stats({"ranks": [16] * b, "tokens": [t] * b}) for b in range(1, 40) for t in (10, 200, 900)]
    latency = [2000.0 + 50.0 * s.count - 0.3 * s.sum_tokens for s in stats]
    fit = fit_linear(stats, latency, ("const", "requests", "tokens"))
    assert "tokens" in fit.dropped_terms and "tokens" not in fit.terms
    assert all(c >= 0 for t, c in zip(fit.terms, fit.coef) if t != "const")


def test_a_negative_intercept_is_dropped_so_tiny_sets_never_cost_less_than_nothing():
    stats = [sample_stats({"ranks": [8] * b}) for b in range(1, 40)]
    fit = fit_linear(stats, [-500.0 + 90.0 * s.count for s in stats], ("const", "requests"))
    assert fit.terms == ("requests",) and fit.dropped_terms == ("const",)
    assert fit.cost(sample_stats({"ranks": [8]})) > 0
    with pytest.raises(ProfileError, match="non-negative"):
        fit_linear(stats, [-1.0] * len(stats), ("const",))


def test_too_few_samples_is_a_clear_error():
    stats = [sample_stats({"ranks": [8]}) for _ in range(4)]
    with pytest.raises(ProfileError, match="too few"):
        fit_linear(stats, [1.0, 2.0, 3.0, 4.0], ("const", "requests", "batch_max_rank", "tokens"))


def test_profile_round_trip(tmp_path):
    model = _fitted(device="cpu", device_name="AMD EPYC", model="smollm2", model_digest="abc", dtype="float32")
    path = tmp_path / "profile.json"
    model.save(path)
    raw = json.loads(path.read_text())
    assert raw["schema"] == SCHEMA and raw["backend"] == "bgmv" and len(raw["samples"]) == 420
    assert set(raw["decode"]) >= {"terms", "coef", "r2_holdout"}
    loaded = PerfModel.load(path, expect_model="smollm2", expect_device="AMD EPYC")
    s = sample_stats({"ranks": [8, 64, 32], "tokens": [100, 300, 20]})
    assert loaded.decode_us(s) == pytest.approx(model.decode_us(s))
    assert loaded.prefill_us(s) == pytest.approx(model.prefill_us(s))


@pytest.mark.parametrize("kwargs, what", [
    ({"expect_model": "llama2-7b"}, "model"),
    ({"expect_device": "NVIDIA H100 80GB HBM3"}, "device"),
    ({"expect_model_digest": "def"}, "model digest"),
    ({"expect_backend": "mbgmv"}, "backend"),
])
def test_load_refuses_a_profile_for_another_model_or_device(tmp_path, kwargs, what):
    path = tmp_path / "profile.json"
    _fitted(device="cpu", device_name="AMD EPYC", model="smollm2", model_digest="abc").save(path)
    with pytest.raises(ProfileMismatchError, match=f"made for {what}"):
        PerfModel.load(path, **kwargs)


@pytest.mark.parametrize("content, match", [
    ("{not json", "invalid JSON"),
    (json.dumps({"schema": "other/1"}), "not a caraserve.profile/1"),
    (json.dumps({"schema": SCHEMA, "backend": "bgmv"}), "must be a string"),
])
def test_malformed_profiles_are_typed_errors(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=match):
        PerfModel.load(path)


def test_bad_terms_and_samples_are_typed_errors():
    with pytest.raises(ProfileError, match="unknown perf-model terms"):
        LinearCost(["const", "bogus"], [1.0, 2.0])
    with pytest.raises(ProfileError, match="phase"):
        PerfModel.fit([{"phase": "warmup", "ranks": [8], "latency_us": 1.0}], ProfileInfo(backend="bgmv"))
    with pytest.raises(ProfileError, match="rank"):
        sample_stats({"ranks": [4096]})


def _brute(requests: list[tuple[int, int, str | None]]) -> BatchStats:
    return BatchStats.from_requests([r for r, _, _ in requests], [t for _, t, _ in requests],
                                    [a for _, _, a in requests])


def _fields(s: BatchStats) -> tuple:
    return (s.count, s.sum_rank, s.max_rank, s.sum_tokens, s.sum_token_rank, s.sum_tokens_sq, s.adapters,
            s.rank_counts())


def test_incremental_stats_match_brute_force_under_random_add_remove_advance():
    rng = random.Random(7)
    live: list[tuple[int, int, str | None]] = []
    stats = BatchStats()
    for _ in range(3000):
        op = rng.random()
        if op < 0.5 or not live:
            req = (rng.choice([0, 8, 16, 32, 64, 128, 1024]), rng.randrange(0, 500),
                   rng.choice([None, "a", "b", "c", "d"]))
            live.append(req)
            stats.add(*req)
        elif op < 0.85:
            req = live.pop(rng.randrange(len(live)))
            stats.remove(*req)
        else:
            k = rng.randrange(1, 5)
            live = [(r, t + k, a) for r, t, a in live]
            stats.advance(k)
        assert _fields(stats) == _fields(_brute(live))
        probe = rng.choice([0, 1, 8, 16, 20, 64, 1024, 2000])
        lower = [r for r, _, _ in live if r < probe]
        assert stats.rank_split(probe) == (len(live) - len(lower), max(lower, default=0))


def test_padding_is_the_cost_of_raising_the_max_rank():
    cost = LinearCost.from_mapping({"const": 100.0, "requests": 3.0, "batch_max_rank": 0.7, "sum_rank": 0.2,
                                    "tokens": 0.05, "tokens_max_rank": 0.001})
    s = _brute([(8, 40, "x"), (16, 10, "y"), (16, 25, None)])
    raised = cost.cost_of(s.count, s.sum_rank, 64, s.sum_tokens, s.sum_token_rank, s.sum_tokens_sq, s.adapters)
    assert cost.padding(s.count, s.sum_tokens, 16, 64) == pytest.approx(raised - cost.cost(s))
    assert LinearCost.from_mapping({"const": 100.0, "sum_rank": 0.2}).padding(3, 75, 16, 64) == 0.0


def test_what_if_cost_equals_cost_of_the_grown_batch():
    rng = random.Random(11)
    cost = LinearCost.from_mapping({"const": 100.0, "requests": 3.0, "batch_max_rank": 0.7, "sum_rank": 0.2,
                                    "tokens": 0.05, "tokens_max_rank": 0.001, "token_rank": 0.002,
                                    "tokens_sq": 1e-4, "adapters": 9.0})
    for _ in range(200):
        reqs = [(rng.choice([8, 16, 64]), rng.randrange(1, 300), rng.choice(["x", "y", None]))
                for _ in range(rng.randrange(0, 20))]
        new = (rng.choice([8, 32, 128]), rng.randrange(1, 300), rng.choice(["x", "z", None]))
        s = _brute(reqs)
        before, after = cost.cost_and_with(s, *new)
        assert before == pytest.approx(cost.cost(s))
        assert after == pytest.approx(cost.cost(_brute(reqs + [new])))
        assert _fields(s) == _fields(_brute(reqs))  # unchanged


def test_run_time_is_the_sum_of_growing_decode_steps():
    cost = LinearCost.from_mapping({"const": 500.0, "requests": 10.0, "tokens": 0.3, "tokens_sq": 1e-4})
    s = sample_stats({"ranks": [8, 16, 64], "tokens": [10, 50, 200]})
    walker, total = s.copy(), 0.0
    for k in range(1, 40):
        total += cost.cost(walker)
        walker.advance(1)
        assert cost.run_time(s, k) == pytest.approx(total)
    budget = cost.run_time(s, 17) + 1e-6
    assert cost.steps_within(s, budget, 100) == 17
    assert cost.steps_within(s, budget, 5) == 5


def test_batch_stats_reject_bad_requests():
    s = BatchStats()
    with pytest.raises(BatchStatsError):
        s.add(2000)
    with pytest.raises(BatchStatsError):
        s.add(8, -1)
    with pytest.raises(BatchStatsError):
        s.remove(8)
    s.add(8, 10, "a")
    with pytest.raises(BatchStatsError):
        s.remove(8, 10, "b")
    s.remove(8, 10, "a")
    assert s.count == 0 and s.max_rank == 0 and s.adapters == 0


def test_no_lora_time_per_token_follows_its_documented_formula():
    model = PerfModel.from_coefficients("bgmv", {"const": 30000.0, "requests": 100.0},
                                        {"const": 20000.0, "tokens": 50.0})
    d = 30000.0 + 100.0 * 32
    p = 20000.0 + 50.0 * 100
    expected = ((200 - 1) * (d + 32 / 200 * p) + p) / 200
    assert model.no_lora_tpt_us(32, 100, 200) == pytest.approx(expected)


def test_cold_start_levels():
    model = PerfModel.from_coefficients("mbgmv", {"const": 1.0}, {"const": 1.0},
                                        {"host": {"const": 1000.0, "sum_rank": 10.0}})
    assert model.cold_start_us(64, 100, "device") == 0.0
    assert model.cold_start_us(64, 100, "host") == pytest.approx(1640.0)
    assert model.cold_start_us(64, 100, "disk") == 0.0  # not profiled: counted as free
    with pytest.raises(ProfileError):
        model.cold_start_us(64, 100, "tape")
