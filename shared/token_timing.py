"""A finished request's latencies: end to end, time to first token (TTFT) and time per output token (TPOT).

The gateway (client view, re-routes included) and each gpu_worker (its own part) record
the same three histograms; both compute them here, from when the request started, when
its first token came, when it ended and how many tokens it generated. TPOT is the mean
gap between output tokens after the first: ``(ended - first_token) / (tokens - 1)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from opentelemetry.metrics import Histogram


class LatencyHistograms(Protocol):
    """Where latencies are recorded (seconds): :class:`shared.telemetry.ServingMetrics` and the
    worker's vLLM-compatible metrics both have these three."""

    ttft: Histogram
    tpot: Histogram
    e2e: Histogram


@dataclass(frozen=True)
class TokenTiming:
    """``ttft_s`` is None when no token came; ``tpot_s`` is None with fewer than two tokens."""

    e2e_s: float
    ttft_s: float | None = None
    tpot_s: float | None = None

    @classmethod
    def of(cls, started: float, first_token: float | None, ended: float, tokens: int) -> TokenTiming:
        """The timing of a request from its timestamps (any one clock) and its token count."""
        if first_token is None:
            return cls(ended - started)
        tpot = (ended - first_token) / (tokens - 1) if tokens > 1 else None
        return cls(ended - started, first_token - started, tpot)

    def record(self, histograms: LatencyHistograms, attributes: Mapping[str, str | int]) -> None:
        """Record e2e always, TTFT and TPOT when known."""
        histograms.e2e.record(self.e2e_s, attributes)
        if self.ttft_s is not None:
            histograms.ttft.record(self.ttft_s, attributes)
        if self.tpot_s is not None:
            histograms.tpot.record(self.tpot_s, attributes)
