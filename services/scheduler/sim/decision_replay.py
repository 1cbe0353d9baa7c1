"""Reads a decision log back, rebuilds the policy's inputs, re-runs the policy and measures state lag.

A decision log (``services.scheduler.decision_log``) holds, per routing decision, the sums of
every candidate worker's running, waiting and total BatchStats, the residency of the request's
adapter there, the worker's capacity, the cores of its CPU prefill pool and the model it was
priced with (the worker's own profiles are logged once each): everything a policy reads. :meth:`Decision.views`
turns them back into :class:`WorkerView` objects that answer every question a policy asks
exactly as the live views did, so :func:`replay` can check that the scheduler routed each
request where ``policy.choose(views, request)`` sends it. :func:`lag_summary` says how old the
worker states behind the decisions were.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.scheduler.decision_log import FORMAT_VERSION, DecisionLogError
from services.scheduler.policies import NoCapacity, Policy, PolicyConfig, PolicyRequest, make_policy
from services.scheduler.worker_view import WorkerView
from shared.batch_stats import BatchStats, BatchStatsError
from shared.levels import Level
from shared.perf_model import PerfModel

SUMMARY_SUMS = ("count", "sum_rank", "max_rank", "adapters")


def stats_from_summary(summary: Mapping[str, Any]) -> BatchStats:
    """A BatchStats with the logged sums (requests re-added by rank and adapter; token sums set)."""
    ranks = [int(r) for r, n in summary["rank_counts"].items() for _ in range(int(n))]
    adapters = [a for a, n in summary["adapter_counts"].items() for _ in range(int(n))]
    if len(adapters) > len(ranks):
        raise DecisionLogError(f"summary has {len(adapters)} adapter uses but {len(ranks)} requests")
    stats = BatchStats()
    try:
        for rank, adapter in itertools.zip_longest(ranks, adapters):
            stats.add(rank, 0, adapter)
    except BatchStatsError as exc:
        raise DecisionLogError(f"bad summary {dict(summary)}: {exc}") from exc
    stats.sum_tokens = int(summary["sum_tokens"])
    stats.sum_token_rank = int(summary["sum_token_rank"])
    stats.sum_tokens_sq = int(summary["sum_tokens_sq"])
    for key in SUMMARY_SUMS:
        if getattr(stats, key) != summary[key]:
            raise DecisionLogError(f"summary {key}={summary[key]} disagrees with its histograms "
                                   f"({getattr(stats, key)})")
    return stats


@dataclass(frozen=True)
class Decision:
    """One logged decision (the raw snapshots are kept as logged)."""

    request_id: str
    attempt: int
    decided_at: float
    request: PolicyRequest
    excluded: tuple[str, ...]
    choice: str | None
    no_capacity: str | None
    choose_us: float
    workers: tuple[Mapping[str, Any], ...]
    models: tuple[PerfModel | None, ...]  # per worker: its own model, or None for the reference

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any], profiles: Mapping[str, PerfModel]) -> Decision:
        """The decision on a log line; ``profiles``: the models of the profile lines before it, by digest."""
        r = entry["request"]
        workers = tuple(entry["workers"])
        unknown = [w["profile"] for w in workers if w["profile"] and w["profile"] not in profiles]
        if unknown:
            raise ValueError(f"profile {unknown[0]} is used before its profile line")
        return cls(entry["request_id"], int(entry["attempt"]), float(entry["decided_at"]),
                   PolicyRequest(int(r["rank"]), int(r["prompt_tokens"]), r["adapter"]), tuple(entry["excluded"]),
                   entry["choice"], entry["no_capacity"], float(entry["choose_us"]), workers,
                   tuple(profiles[w["profile"]] if w["profile"] else None for w in workers))

    def views(self) -> list[WorkerView]:
        """The candidate workers as the policy saw them, in the same order."""
        return [_view(w, self.request.adapter, perf) for w, perf in zip(self.workers, self.models)]

    @property
    def pending(self) -> int:
        """Routed requests the held states did not show yet, over all candidates."""
        return sum(int(w["pending"]) for w in self.workers)


def _view(snapshot: Mapping[str, Any], adapter: str | None, perf: PerfModel | None) -> WorkerView:
    level = snapshot["residency"]
    return WorkerView(snapshot["worker_id"], int(snapshot["max_batch"]),
                      running=stats_from_summary(snapshot["running"]),
                      waiting=stats_from_summary(snapshot["waiting"]),
                      total=stats_from_summary(snapshot["total"]),
                      resident={adapter} if adapter is not None and level == Level.DEVICE else set(),
                      host={adapter} if adapter is not None and level == Level.HOST else set(),
                      free_kv_blocks=snapshot["free_kv_blocks"], block_size=int(snapshot["block_size"]),
                      perf=perf, assist_cores=int(snapshot["assist_cores"]))


@dataclass(frozen=True)
class LogHeader:
    """The policy line of a decision log."""

    scheduler: str
    policy: PolicyConfig
    slo_us: float | None
    profile: str

    def make_policy(self, perf: PerfModel | None = None) -> Policy:
        """The logged policy (``perf`` defaults to the logged profile, when there is one)."""
        if perf is None and self.profile:
            perf = PerfModel.load(self.profile)
        return make_policy(self.policy, perf, self.slo_us)


def read_log(path: str | Path) -> tuple[LogHeader, list[Decision]]:
    """The header and the decisions of a decision log; DecisionLogError names a bad line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DecisionLogError(f"cannot read the decision log {path}: {exc}") from exc
    if not lines:
        raise DecisionLogError(f"{path} is empty (no policy line)")
    header, decisions, profiles = None, [], {}
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
            if number == 1:
                header = _header(entry)
            elif entry.get("type") == "profile":
                profiles[entry["digest"]] = PerfModel.from_dict(entry["model"], f"{path}:{number}")
            elif entry.get("type") == "decision":
                decisions.append(Decision.from_entry(entry, profiles))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DecisionLogError(f"{path}:{number}: not a decision log line ({exc!r})") from exc
    assert header is not None
    return header, decisions


def _header(entry: Mapping[str, Any]) -> LogHeader:
    if entry.get("type") != "policy" or entry.get("v") != FORMAT_VERSION:
        raise ValueError(f"expected a version {FORMAT_VERSION} policy line, got {entry.get('type')!r} "
                         f"v{entry.get('v')!r}")
    return LogHeader(entry["scheduler"], PolicyConfig(**entry["policy"]), entry["slo_us"], entry["profile"])


@dataclass(frozen=True)
class Mismatch:
    """A decision the policy does not reproduce."""

    index: int
    request_id: str
    logged: str | None
    replayed: str | None


def replay(policy: Policy, decisions: Iterable[Decision]) -> list[Mismatch]:
    """Re-run ``policy.choose`` on each decision's inputs, in log order; the ones that differ.

    A NoCapacity counts as ``None`` on both sides (its wording is not compared).
    """
    mismatches = []
    for index, decision in enumerate(decisions):
        replayed = policy.choose(decision.views(), decision.request) if decision.workers else NoCapacity("none")
        replayed_id = replayed if isinstance(replayed, str) else None
        if replayed_id != decision.choice:
            mismatches.append(Mismatch(index, decision.request_id, decision.choice, replayed_id))
    return mismatches


def percentiles(values: Sequence[float], scale: float = 1.0) -> dict[str, float | None]:
    """p50, p99 (nearest rank) and max of ``values`` times ``scale``; None when empty."""
    if not values:
        return {"p50": None, "p99": None, "max": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * scale

    return {"p50": rank(0.50), "p99": rank(0.99), "max": ordered[-1] * scale}


def lag_summary(decisions: Sequence[Decision]) -> dict[str, Any]:
    """How old the worker states behind the decisions were, over every (decision, candidate) pair.

    ``state_age_ms``: since the scheduler received the state; ``state_lag_ms``: since the worker
    took it (includes transport); ``decisions_with_pending``: decisions where some candidate had
    routed requests its state did not show yet (counted as waiting by the fleet).
    """
    pairs = [w for d in decisions for w in d.workers]
    return {"decisions": len(decisions), "worker_views": len(pairs),
            "state_age_ms": percentiles([float(w["age_s"]) for w in pairs], 1e3),
            "state_lag_ms": percentiles([float(w["lag_s"]) for w in pairs], 1e3),
            "decisions_with_pending": sum(1 for d in decisions if d.pending),
            "pending_per_decision": percentiles([float(d.pending) for d in decisions]),
            "oldest_pending_ms": percentiles([float(w["pending_age_s"]) for w in pairs if w["pending"]], 1e3),
            "choose_us": percentiles([d.choose_us for d in decisions])}
