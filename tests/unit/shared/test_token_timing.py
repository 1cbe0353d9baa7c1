"""TTFT, TPOT and end-to-end latency of a finished request, as the gateway and the workers record them."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from shared.token_timing import TokenTiming


@dataclass
class Recorded:
    """A histogram that keeps what it was given."""

    values: list[tuple[float, dict]] = field(default_factory=list)

    def record(self, value: float, attributes: dict) -> None:
        self.values.append((value, dict(attributes)))


@dataclass
class Histograms:
    ttft: Recorded = field(default_factory=Recorded)
    tpot: Recorded = field(default_factory=Recorded)
    e2e: Recorded = field(default_factory=Recorded)


def test_tpot_is_the_mean_gap_after_the_first_token():
    timing = TokenTiming.of(started=10.0, first_token=10.5, ended=12.5, tokens=5)
    assert timing == TokenTiming(e2e_s=2.5, ttft_s=0.5, tpot_s=pytest.approx(0.5))


def test_without_tokens_only_e2e_is_known_and_one_token_has_no_tpot():
    assert TokenTiming.of(10.0, None, 11.0, 0) == TokenTiming(1.0)
    assert TokenTiming.of(10.0, 10.25, 11.0, 1) == TokenTiming(1.0, 0.25, None)


def test_record_writes_what_is_known_with_the_attributes():
    histograms = Histograms()
    labels = {"adapter": "sql"}
    TokenTiming.of(0.0, 1.0, 3.0, 3).record(histograms, labels)
    TokenTiming.of(0.0, None, 2.0, 0).record(histograms, labels)
    assert histograms.e2e.values == [(3.0, labels), (2.0, labels)]
    assert histograms.ttft.values == [(1.0, labels)] and histograms.tpot.values == [(1.0, labels)]
