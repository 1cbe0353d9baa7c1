"""bench/routing/live_routing.py's offline parts: stale-state counting and the decision-log cost probe (no stack)."""

from __future__ import annotations

from bench.routing.live_routing import record_cost_us, seq_behind
from bench.routing.live_workload import LiveWorkload, make_schedule
from services.scheduler.sim.decision_replay import Decision
from services.scheduler.policies import PolicyRequest
from shared.schemas import WorkerState


def _state(seq: int, timestamp: float) -> WorkerState:
    return WorkerState(worker_id="w0", model="m", backend="bgmv", seq=seq, timestamp=timestamp)


def _decision(at: float, held: int) -> Decision:
    return Decision("r", 0, at, PolicyRequest(8, 4, "a"), (), "w0", None, 1.0, ({"worker_id": "w0", "seq": held},), (None,))


def test_seq_behind_counts_states_taken_before_the_decision_but_not_held():
    states = {"w0": [_state(s, 100.0 + s) for s in range(1, 6)]}  # seq s taken at 100 + s
    assert seq_behind([_decision(103.5, 3), _decision(103.5, 1), _decision(110.0, 5), _decision(102.0, 4)],
                      states) == [0, 2, 0, 0]


def test_record_cost_probe_measures_each_record():
    figures = record_cost_us(workers=3, running=4, decisions=20)
    assert 0 < figures["p50"] <= figures["p99"] <= figures["max"]


def test_schedule_mixes_every_model_and_sends_the_burst_first():
    schedule = make_schedule("base", ["a8", "b64"], LiveWorkload(requests=7, burst=3, spacing_ms=10.0))
    assert [r.model for _, r in schedule] == ["base", "a8", "b64", "base", "a8", "b64", "base"]
    assert [round(t, 3) for t, _ in schedule] == [0.0, 0.0, 0.0, 0.01, 0.02, 0.03, 0.04]
    assert len({r.request_id for _, r in schedule}) == 7 and all(r.ignore_eos for _, r in schedule)
