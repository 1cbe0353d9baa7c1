"""Overload: 3x ``max_inflight`` concurrent streams get 200 or a prompt 429, never a 5xx, and memory stays bounded.

The gateway of ``caraserve up``'s stack (two workers) runs with ``max_inflight`` = ``MAX_INFLIGHT``.
Each round keeps ``3 * MAX_INFLIGHT`` clients streaming for ``ROUND_S`` seconds: each client sends
its next completion as soon as the previous one ended (``RETRY_S`` after a 429). The rules:

* every request gets 200 (a stream that ends with ``[DONE]`` and no error event) or 429 (an
  OpenAI-style ``rate_limit_error``), within ``REFUSE_S`` for a 429; none gets a 503 or other 5xx;
* the RSS of every process of the stack (services and nats-server) stays bounded: its peak
  during the rounds exceeds its RSS after a warm-up by less than ``RSS_GROWTH_MIB``, and the
  last round's peak exceeds the first round's by less than ``RSS_DRIFT_MIB`` (no leak per round);
* afterwards every process is alive and a request succeeds.

``CARASERVE_OVERLOAD_ROUNDS`` (default 2) and ``CARASERVE_OVERLOAD_ROUND_S`` (default 4) make a longer run.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time
from collections.abc import Iterator

import aiohttp
import pytest

from launcher.local_stack import LocalStack
from tests.chaos.http_stream import HttpOutcome, stream_completion
from tests.chaos.stack import ReusedStack, base_model, completion, dead, rss_mib, stack_config
from tests.reliability_report import Tally

pytestmark = pytest.mark.timeout(300)

MAX_INFLIGHT = 8
STREAMS = 3 * MAX_INFLIGHT
MAX_TOKENS = 64
ANSWER_S = 60.0
REFUSE_S = 2.0  # a 429 comes at once
RETRY_S = 0.05  # a refused client tries again this soon
RSS_GROWTH_MIB = 128.0
RSS_DRIFT_MIB = 32.0
ROUNDS = int(os.environ.get("CARASERVE_OVERLOAD_ROUNDS", "") or 2)
ROUND_S = float(os.environ.get("CARASERVE_OVERLOAD_ROUND_S", "") or 4)


class PeakRss:
    """Samples every process's RSS on a thread while inside; ``peak`` holds the maxima (MiB)."""

    def __init__(self, stack: LocalStack, interval_s: float = 0.1) -> None:
        self.stack, self.interval_s = stack, interval_s
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            for name, mib in rss_mib(self.stack).items():
                self.peak[name] = max(self.peak.get(name, 0.0), mib)
            if self._stop.wait(self.interval_s):
                return


@pytest.fixture(scope="module")
def overload_stack(tiny_model_dir, tiny_adapters, tmp_path_factory) -> Iterator[LocalStack]:
    config = stack_config(tiny_model_dir, tiny_adapters, tmp_path_factory.mktemp("overload"), workers=2,
                          schedulers=1, env={"CARASERVE_MAX_INFLIGHT": str(MAX_INFLIGHT)})
    holder = ReusedStack(config, supervise=False)
    try:
        yield holder.get()
    finally:
        holder.close()


def body(model: str, i: int) -> dict:
    return {"model": model, "prompt": f"Overload request number {i}", "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}


async def one_round(url: str, model: str, duration_s: float) -> list[tuple[HttpOutcome, float]]:
    """STREAMS clients, each sending completions back to back for ``duration_s``; every outcome
    with its latency to the end."""
    results: list[tuple[HttpOutcome, float]] = []
    until = time.monotonic() + duration_s

    async def client(session: aiohttp.ClientSession, i: int) -> None:
        while True:
            start = time.monotonic()
            outcome = await stream_completion(session, url, body(model, i), ANSWER_S)
            results.append((outcome, outcome.ended_at - start))
            if outcome.ended_at >= until:
                return
            if outcome.status == 429:
                await asyncio.sleep(RETRY_S)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(session, i) for i in range(STREAMS)))
    return results


def verdict(outcome: HttpOutcome, latency_s: float) -> str:
    if outcome.status == 429:
        if outcome.error_code != "overloaded":
            return f"429 {outcome.error_code}"
        return "429" if latency_s <= REFUSE_S else "429 late"
    if outcome.status == 200 and outcome.done and not outcome.error_code:
        return "200"
    return outcome.kind()


def fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{name} {mib:.0f}" for name, mib in sorted(values.items()))


async def test_three_times_max_inflight_gets_200_or_429_and_memory_stays_bounded(overload_stack):
    stack = overload_stack
    model = base_model(stack)
    await one_round(stack.http_url, model, 0.0)  # warm-up: first-use allocations are not growth
    baseline = rss_mib(stack)
    tally = Tally()
    round_peaks: list[dict[str, float]] = []
    verdicts: collections.Counter = collections.Counter()
    for _ in range(ROUNDS):
        with PeakRss(stack) as rss:
            results = await one_round(stack.http_url, model, ROUND_S)
        round_peaks.append(rss.peak)
        verdicts.update(verdict(o, s) for o, s in results)
    status, _ = await asyncio.to_thread(completion, stack, model)
    dead_now = dead(stack)

    for name, count in verdicts.items():
        tally.add("overload", f"{STREAMS} clients at max_inflight {MAX_INFLIGHT} ({ROUNDS}x{ROUND_S:g} s)", name, count)
    growth = {n: max(p.get(n, 0.0) for p in round_peaks) - baseline.get(n, 0.0) for n in baseline}
    drift = {n: round_peaks[-1].get(n, 0.0) - round_peaks[0].get(n, 0.0) for n in baseline}
    for name in baseline:
        tally.add("overload", f"RSS growth < {RSS_GROWTH_MIB:.0f} MiB: {name}",
                  "bounded" if growth[name] < RSS_GROWTH_MIB else "grew")
    tally.save()
    print(f"RSS MiB baseline {fmt(baseline)}; peak growth {fmt(growth)}; round-over-round {fmt(drift)}")

    assert set(verdicts) <= {"200", "429"}, f"requests not answered 200 or a prompt 429: {dict(verdicts)}"
    assert verdicts["200"] >= MAX_INFLIGHT and verdicts["429"] > 0, f"no overload was exercised: {dict(verdicts)}"
    too_much = {n: round(g) for n, g in growth.items() if g >= RSS_GROWTH_MIB}
    assert not too_much, f"RSS grew past {RSS_GROWTH_MIB} MiB (baseline {baseline}): {too_much}"
    leaking = {n: round(d) for n, d in drift.items() if d >= RSS_DRIFT_MIB}
    assert ROUNDS < 2 or not leaking, f"RSS peaks rose round over round by >= {RSS_DRIFT_MIB} MiB: {leaking}"
    assert not dead_now, f"processes died: {dead_now}"
    assert status == 200, status
