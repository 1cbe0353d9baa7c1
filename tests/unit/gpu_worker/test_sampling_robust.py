"""Sampling never raises for a value the schema accepts, nor for odd logits (issue 13: a temperature
of 1e-300 killed the engine thread inside torch.multinomial)."""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.request import RequestError, SamplingParams
from services.gpu_worker.sampling import GREEDY_BELOW, is_greedy, make_generator, sample
from shared.schemas.sampling import MAX_COUNT

V = 50
INF, NAN = float("inf"), float("nan")


def rows(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 5


def draw(logits: torch.Tensor, params: SamplingParams, seed: int = 1) -> list[int]:
    n = logits.shape[0]
    return sample(logits, [params] * n, [make_generator(seed + i) for i in range(n)])


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-38, 1e-20, GREEDY_BELOW / 2])
def test_a_tiny_temperature_is_greedy(temperature):
    logits = rows()
    params = SamplingParams(temperature=temperature)
    assert is_greedy(params)
    assert draw(logits, params) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature", [GREEDY_BELOW, 1e-4, 0.7, 2.0, 100.0])
def test_any_accepted_temperature_samples_a_valid_token(temperature):
    tokens = draw(rows(8), SamplingParams(temperature=temperature, top_p=0.9, top_k=10))
    assert all(0 <= t < V for t in tokens)


def test_just_above_the_greedy_bound_a_huge_logit_gap_cannot_overflow():
    logits = torch.zeros(2, V)
    logits[0, 7], logits[1, 3] = 3e38, -3e38  # / 1e-5 overflows float32, not the float64 filter
    assert draw(logits, SamplingParams(temperature=GREEDY_BELOW))[0] == 7


def test_temperatures_past_the_engine_bound_are_refused_up_front():
    with pytest.raises(RequestError):
        SamplingParams(temperature=1e30)


@pytest.mark.parametrize("top_p", [1e-300, 5e-324, 1e-38, 1e-9])
def test_a_tiny_top_p_keeps_the_top_token(top_p):
    logits = rows()
    assert draw(logits, SamplingParams(temperature=1.0, top_p=top_p)) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("top_k", [1, V - 1, V, V + 1, MAX_COUNT, -1, 0])
def test_any_top_k_works(top_k):
    logits = rows()
    tokens = draw(logits, SamplingParams(temperature=0.8, top_k=top_k))
    assert all(0 <= t < V for t in tokens)
    if top_k == 1:
        assert tokens == logits.argmax(-1).tolist()


def test_nan_logits_never_win_and_an_all_nan_row_does_not_raise():
    logits = rows(3)
    logits[0, :] = NAN
    logits[1, ::2] = NAN
    logits[2, 5] = NAN
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.5),
                   SamplingParams(temperature=1e-300, top_p=1e-300)):
        tokens = draw(logits, params)
        assert 0 <= tokens[0] < V
        assert tokens[1] % 2 == 1 and tokens[2] != 5


def test_infinite_logits_take_all_the_mass_and_all_masked_rows_fall_back_to_argmax():
    logits = rows(4)
    logits[0, 11] = INF
    logits[1, [4, 9]] = INF
    logits[2, :] = -INF
    logits[3, :] = INF
    for seed in range(5):
        tokens = draw(logits, SamplingParams(temperature=1.3, top_p=0.2, top_k=3), seed)
        assert tokens[0] == 11 and tokens[1] in (4, 9) and 0 <= tokens[2] < V and 0 <= tokens[3] < V


def test_extreme_mixed_batch_in_one_call():
    logits = rows(6)
    logits[1, 0] = NAN
    logits[4, :] = -INF
    params = [SamplingParams(temperature=1e-300), SamplingParams(temperature=1e-38, top_p=1e-300),
              SamplingParams(temperature=100.0, top_k=MAX_COUNT), SamplingParams(temperature=1.0, top_p=1e-300),
              SamplingParams(temperature=0.5), SamplingParams(temperature=2.0, top_p=1.0, top_k=-1)]
    tokens = sample(logits, params, [make_generator(i) for i in range(6)])
    assert all(0 <= t < V for t in tokens)
    assert tokens[0] == logits[0].argmax() and tokens[3] == logits[3].argmax()


def test_same_seed_same_tokens():
    logits = rows(4, seed=9)
    params = SamplingParams(temperature=0.9, top_p=0.95)
    assert draw(logits, params, seed=42) == draw(logits, params, seed=42)
