"""An optional log of every routing decision: the policy inputs the scheduler held, and its choice.

Off by default. With ``SchedulerConfig.decision_log`` set to a path (``{name}`` there is replaced
by the replica's name, so replicas sharing one configuration write separate files), each call
of the policy appends one JSON line, written before the request is counted as pending on the
chosen worker, so the line holds exactly what the policy saw. ``services.scheduler.sim.decision_replay``
reads the file back, rebuilds the policy's inputs and re-runs the policy on them.

Format (``FORMAT_VERSION`` 2). The first line describes the policy::

    {"type": "policy", "v": 2, "scheduler": NAME, "policy": {PolicyConfig fields},
     "slo_us": float | null, "profile": PATH}

then, before the first decision that prices a worker with a worker's own profile, one line
per such profile::

    {"type": "profile", "digest": the digest the worker published, "model": PerfModel.to_dict()}

and one line per decision::

    {"type": "decision", "request_id": str, "attempt": int, "decided_at": wall-clock s,
     "request": {"rank": int, "prompt_tokens": int, "adapter": str | null},
     "excluded": [worker ids], "choice": worker id | null, "no_capacity": reason | null,
     "choose_us": time the policy took, "workers": [SNAPSHOT, ...]}

with one SNAPSHOT per candidate worker, in the order the policy got them::

    {"worker_id", "max_batch", "block_size", "free_kv_blocks",
     "residency": where the request's adapter is on that worker (device | host | disk),
     "seq": the seq of the worker state held, "state_timestamp": when the worker took it (wall s),
     "age_s": since the scheduler received it, "lag_s": decided_at - state_timestamp,
     "pending": routed requests the state does not show yet, "pending_age_s": the oldest one's age,
     "profile": the digest of the worker's model the policy priced it with ("": the reference model),
     "assist_cores": cores of its healthy CPU prefill pool, "running" | "waiting" | "total": SUMMARY}

where a SUMMARY is a BatchStats' sums: ``count``, ``sum_rank``, ``max_rank``, ``sum_tokens``,
``sum_token_rank``, ``sum_tokens_sq``, ``adapters`` (distinct), ``rank_counts`` ({rank: requests},
keys as strings) and ``adapter_counts`` ({adapter: requests}).

Cost when on: one JSON line per decision (tens of microseconds for a few workers), written to a
line-buffered file. A write that fails is logged once and turns the log off; routing goes on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from services.scheduler.fleet import WorkerRecord
from services.scheduler.policies import NoCapacity, Policy, PolicyRequest
from shared.batch_stats import BatchStats

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
NAME_FIELD = "{name}"


class DecisionLogError(ValueError):
    """The decision log cannot be opened or read (the message names the file)."""


def stats_summary(stats: BatchStats) -> dict[str, Any]:
    """The sums of ``stats`` the policies read (JSON writes the histograms' keys as strings)."""
    return {"count": stats.count, "sum_rank": stats.sum_rank, "max_rank": stats.max_rank,
            "sum_tokens": stats.sum_tokens, "sum_token_rank": stats.sum_token_rank,
            "sum_tokens_sq": stats.sum_tokens_sq, "adapters": stats.adapters,
            "rank_counts": stats.rank_counts(), "adapter_counts": stats.adapter_counts()}


def worker_snapshot(record: WorkerRecord, adapter: str | None, now: float, decided_at: float) -> dict[str, Any]:
    """What the policy knows about one worker at a decision (``now``: the fleet's clock)."""
    view, state = record.view, record.state
    oldest = min((p.routed_at for p in record.pending.values()), default=now)
    return {"worker_id": view.worker_id, "max_batch": view.max_batch, "block_size": view.block_size,
            "free_kv_blocks": view.free_kv_blocks, "residency": view.residency(adapter), "seq": state.seq,
            "state_timestamp": state.timestamp, "age_s": now - record.last_seen,
            "lag_s": decided_at - state.timestamp, "pending": len(record.pending), "pending_age_s": now - oldest,
            "profile": state.profile if record.perf is not None else "", "assist_cores": view.assist_cores,
            "running": stats_summary(view.running), "waiting": stats_summary(view.waiting),
            "total": stats_summary(view.total)}


class DecisionLog:
    """Appends decisions to a JSON-lines file; see the module docstring for the format."""

    def __init__(self, stream: IO[str], path: Path) -> None:
        self._stream: IO[str] | None = stream
        self.path = path
        self.written = 0
        self._profiles: set[str] = set()  # digests whose profile line is written

    @classmethod
    def open(cls, path: str, scheduler: str, policy: Policy, profile: str = "") -> DecisionLog:
        """Create (truncate) the log at ``path`` and write its policy line."""
        target = Path(path.replace(NAME_FIELD, scheduler))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            stream = target.open("w", encoding="utf-8", buffering=1)
        except OSError as exc:
            raise DecisionLogError(f"cannot open the decision log {target}: {exc}") from exc
        log = cls(stream, target)
        log._write({"type": "policy", "v": FORMAT_VERSION, "scheduler": scheduler,
                    "policy": dataclasses.asdict(policy.config), "slo_us": getattr(policy, "slo_us", None),
                    "profile": profile})
        logger.info("routing decisions are logged to %s", target)
        return log

    @property
    def enabled(self) -> bool:
        return self._stream is not None

    def record(self, request_id: str, attempt: int, request: PolicyRequest, records: Sequence[WorkerRecord],
               excluded: Iterable[str], choice: str | NoCapacity, now: float, choose_s: float) -> None:
        """Log one decision: ``records`` as the policy saw them (before the choice is reserved)."""
        if self._stream is None:
            return
        self._write_profiles(records)
        decided_at = time.time()
        adapter = None if request.adapter is None else str(request.adapter)
        entry = {"type": "decision", "request_id": request_id, "attempt": attempt, "decided_at": decided_at,
                 "request": {"rank": request.rank, "prompt_tokens": request.prompt_tokens, "adapter": adapter},
                 "excluded": sorted(excluded),
                 "choice": choice if isinstance(choice, str) else None,
                 "no_capacity": choice.reason if isinstance(choice, NoCapacity) else None,
                 "choose_us": choose_s * 1e6,
                 "workers": [worker_snapshot(r, adapter, now, decided_at) for r in records]}
        self._write(entry)
        self.written += 1

    def _write_profiles(self, records: Sequence[WorkerRecord]) -> None:
        """Write the profile line of each worker model not yet in the log."""
        for record in records:
            digest = record.state.profile
            if record.perf is not None and digest not in self._profiles and self._stream is not None:
                self._profiles.add(digest)
                self._write({"type": "profile", "digest": digest, "model": record.perf.to_dict()})

    def _write(self, entry: dict[str, Any]) -> None:
        assert self._stream is not None
        try:
            self._stream.write(json.dumps(entry, separators=(",", ":"), check_circular=False) + "\n")
        except OSError as exc:
            logger.error("cannot write the decision log %s (%s); decision logging is off", self.path, exc)
            self.close()

    def close(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            try:
                stream.close()
            except OSError as exc:
                logger.error("cannot close the decision log %s: %s", self.path, exc)
