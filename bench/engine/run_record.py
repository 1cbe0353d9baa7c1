"""Per-request token timing of one benchmark run, its summary, and progress lines on stderr."""

from __future__ import annotations

import os
import resource
import sys
import time
from dataclasses import dataclass, field

from bench.engine.metrics import summarize

PROGRESS_INTERVAL_S = 5.0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (other work on the machine skews CPU timings)."""
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class RequestTiming:
    """When one request produced its first and its last useful token."""

    wanted: int
    first: float | None = None
    last: float | None = None
    count: int = 0


@dataclass
class RunRecord:
    """Token arrival times of every request, relative to ``t0`` (all requests arrive at t0)."""

    label: str
    wanted: dict[str, int]
    t0: float = field(default_factory=time.perf_counter)
    cpu0: float = field(default_factory=cpu_seconds)
    requests: dict[str, RequestTiming] = field(init=False)
    _last_progress: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.requests = {rid: RequestTiming(n) for rid, n in self.wanted.items()}
        self._last_progress = self.t0

    def start(self) -> None:
        """Reset the clock: the requests arrive now."""
        self.t0 = self._last_progress = time.perf_counter()
        self.cpu0 = cpu_seconds()

    def tokens(self, request_id: str, count: int, at: float) -> None:
        """``count`` useful tokens of ``request_id`` became available at ``at`` (perf_counter)."""
        timing = self.requests[request_id]
        if timing.first is None:
            timing.first = at
        timing.count += count
        timing.last = at

    def useful_tokens(self) -> int:
        return sum(t.count for t in self.requests.values())

    def finished(self) -> int:
        return sum(t.count >= t.wanted for t in self.requests.values())

    def progress(self, force: bool = False) -> None:
        """Print a progress line to stderr at most every PROGRESS_INTERVAL_S seconds."""
        now = time.perf_counter()
        if not force and now - self._last_progress < PROGRESS_INTERVAL_S:
            return
        self._last_progress = now
        elapsed = now - self.t0
        tokens = self.useful_tokens()
        print(f"[bench {self.label}] {elapsed:7.1f} s  {self.finished()}/{len(self.requests)} requests done  "
              f"{tokens} tokens  {tokens / max(elapsed, 1e-9):.1f} tok/s  load {load_average()[0]}",
              file=sys.stderr, flush=True)

    def check_complete(self) -> None:
        """Raise unless every request got exactly the tokens it asked for."""
        bad = {rid: (t.count, t.wanted) for rid, t in self.requests.items() if t.count != t.wanted}
        if bad:
            raise RuntimeError(f"{self.label}: requests got the wrong number of tokens (got, wanted): {bad}")

    def summary(self) -> dict:
        """Throughput and TTFT / time-per-output-token summaries (seconds), taken when the run ends.

        ``cpu_s`` is the process's CPU time over the run: tokens per CPU second depend less on
        other work sharing the machine than tokens per wall second do.
        """
        cpu = cpu_seconds() - self.cpu0
        self.check_complete()
        end = max(t.last for t in self.requests.values())
        wall = end - self.t0
        ttft = [t.first - self.t0 for t in self.requests.values()]
        tpot = [(t.last - t.first) / (t.wanted - 1) for t in self.requests.values()]
        useful = self.useful_tokens()
        return {"wall_s": wall, "useful_tokens": useful, "tokens_per_s": useful / wall, "cpu_s": cpu,
                "tokens_per_cpu_s": useful / cpu if cpu > 0 else None,
                "ttft_s": summarize(ttft), "tpot_s": summarize(tpot)}
