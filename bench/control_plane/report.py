"""Figures of the control-plane benchmark: added latency per request, its breakdown, throughput, the plot.

A request's path and the timestamps that cut it into stages (all wall-clock ns on one host):

    client sent -> gateway.request start -> scheduler.route start -> worker.queue start (the
    worker received the submit) -> worker.prefill end (the first token) -> client got it

Engine TTFT is ``worker.prefill end - worker.queue start``; what the NATS path adds is the
client's TTFT minus that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.control_plane.clients import LoadRun, Timed
from bench.control_plane.otlp_sink import SpanTimes

STAGES = ("client_to_gateway", "gateway_to_scheduler", "scheduler_to_worker", "engine", "worker_to_client")


@dataclass
class RequestSpans:
    """The span timestamps of one request that the breakdown needs (ns)."""

    gateway_start: int | None = None
    route_start: int | None = None
    submitted: int | None = None
    first_token: int | None = None
    worker: str | None = None

    @property
    def complete(self) -> bool:
        return None not in (self.gateway_start, self.route_start, self.submitted, self.first_token)


def index_spans(spans: list[SpanTimes]) -> dict[str, RequestSpans]:
    """Per request id, the timestamps of its gateway, scheduler and worker spans."""
    out: dict[str, RequestSpans] = {}
    for span in spans:
        request_id = span.attributes.get("request.id")
        if not isinstance(request_id, str):
            continue
        rec = out.setdefault(request_id, RequestSpans())
        if span.name == "gateway.request":
            rec.gateway_start = span.start_ns
        elif span.name == "scheduler.route":
            rec.route_start = span.start_ns
        elif span.name == "worker.queue":
            rec.submitted, rec.worker = span.start_ns, span.attributes.get("worker.id")
        elif span.name == "worker.prefill":
            rec.first_token = span.end_ns
    return out


def percentiles_ms(values_ns: list[int] | np.ndarray) -> dict[str, float]:
    a = np.asarray(values_ns, dtype=np.float64) / 1e6
    if a.size == 0:
        return {}
    return {"p50": round(float(np.percentile(a, 50)), 3), "p90": round(float(np.percentile(a, 90)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "mean": round(float(a.mean()), 3),
            "max": round(float(a.max()), 3)}


@dataclass
class LatencySamples:
    """Per request (ns): the client's TTFT, the engine's TTFT and each stage of the path."""

    client: np.ndarray
    engine: np.ndarray
    stages: dict[str, np.ndarray]
    unmatched: int

    @property
    def added(self) -> np.ndarray:
        return self.client - self.engine


def latency_samples(timed: list[Timed], spans: dict[str, RequestSpans]) -> LatencySamples:
    rows = []
    for t in timed:
        rec = spans.get(t.request_id)
        if t.first_ns is None or rec is None or not rec.complete:
            continue
        rows.append((t.first_ns - t.sent_ns, rec.first_token - rec.submitted,
                     rec.gateway_start - t.sent_ns, rec.route_start - rec.gateway_start,
                     rec.submitted - rec.route_start, rec.first_token - rec.submitted, t.first_ns - rec.first_token))
    a = np.asarray(rows, dtype=np.int64).reshape(-1, 7)
    return LatencySamples(a[:, 0], a[:, 1], {name: a[:, 2 + i] for i, name in enumerate(STAGES)},
                          unmatched=len(timed) - len(rows))


def latency_summary(samples: LatencySamples, errors: int) -> dict:
    client, engine, added = (percentiles_ms(x) for x in (samples.client, samples.engine, samples.added))
    return {"requests": int(samples.client.size), "errors": errors, "unmatched_spans": samples.unmatched,
            "client_ttft_ms": client, "engine_ttft_ms": engine, "added_ms": added,
            "client_over_engine_p50": round(client["p50"] / engine["p50"], 2) if engine.get("p50") else None,
            "stages_p50_ms": {k: percentiles_ms(v).get("p50") for k, v in samples.stages.items()}}


def throughput_summary(run: LoadRun) -> dict:
    ok = [t for t in run.requests if t.ok]
    errors: dict[str, int] = {}
    for t in run.requests:
        if not t.ok:
            errors[t.error or t.finish_reason or "unknown"] = errors.get(t.error or t.finish_reason or "unknown", 0) + 1
    span_s = (max(t.final_ns for t in ok) - run.started_ns) / 1e9 if ok else float("nan")
    return {"offered_rps": run.rate, "duration_s": run.duration_s, "sent": len(run.requests), "completed": len(ok),
            "errors": errors, "achieved_rps": round(len(ok) / span_s, 1) if ok else 0.0,
            "send_window_s": round((run.sent_until_ns - run.started_ns) / 1e9, 3),
            "ttft_ms": percentiles_ms([t.first_ns - t.sent_ns for t in ok if t.first_ns is not None]),
            "e2e_ms": percentiles_ms([t.final_ns - t.sent_ns for t in ok])}


def completions_per_second(run: LoadRun, bin_s: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(bin start in s since the run began, completions per second in that bin), over the send window."""
    ends = np.asarray([(t.final_ns - run.started_ns) / 1e9 for t in run.requests if t.ok])
    window = (run.sent_until_ns - run.started_ns) / 1e9
    if ends.size == 0 or window < bin_s:
        return np.zeros(0), np.zeros(0)
    edges = np.arange(int(window / bin_s) + 1) * bin_s  # whole bins within the send window
    counts, _ = np.histogram(ends, bins=edges)
    return edges[:-1], counts / bin_s


def plot(path: Path, latency: dict[str, LatencySamples], runs: list[LoadRun], targets: tuple[float, float],
         floor_ms: list[float]) -> None:
    """Left: CDFs of the added latency, the engine's TTFT and the bare-transport floor; right:
    completions/s under load."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, samples in latency.items():
        for label, values in ((f"{name}: added by the path", samples.added), (f"{name}: engine TTFT", samples.engine)):
            x = np.sort(values) / 1e6
            left.plot(x, np.arange(1, x.size + 1) / max(x.size, 1), label=label)
    x = np.sort(np.asarray(floor_ms))
    left.plot(x, np.arange(1, x.size + 1) / max(x.size, 1), color="black", linestyle="--",
              label="bare NATS, same 5 messages (floor)")
    for value, label in zip(targets, ("p50 target", "p99 target")):
        left.axvline(value, color="grey", linestyle=":", linewidth=1)
        left.text(value, 0.02, label, rotation=90, fontsize=7, color="grey")
    left.set(xscale="log", xlabel="ms (1-token requests, one at a time)", ylabel="fraction of requests",
             title="Control-plane latency vs in-engine TTFT")
    left.xaxis.set_major_locator(matplotlib.ticker.FixedLocator([0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]))
    left.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.legend(fontsize=8)
    for run in runs:
        x, y = completions_per_second(run)
        right.step(x, y, where="post", label=f"offered {run.rate:.0f}/s")
        right.axhline(run.rate, color="grey", linestyle=":", linewidth=1)
    right.set_ylim(bottom=0)
    right.set(xlabel="s since the load started", ylabel="completed requests / s (0.5 s bins)",
              title="Open-loop load through the gateway (NATS)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
