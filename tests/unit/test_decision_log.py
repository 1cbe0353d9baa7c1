"""The scheduler's decision log: what it writes is enough to re-run the policy exactly (no network)."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from services.scheduler.config import SchedulerConfig
from services.scheduler.decision_log import DecisionLog, DecisionLogError, stats_summary
from services.scheduler.sim.decision_replay import lag_summary, read_log, replay, stats_from_summary
from services.scheduler.fleet import Fleet
from services.scheduler.policies import PolicyConfig, PolicyRequest, make_policy
from shared.batch_stats import BatchStats
from shared.levels import LEVELS
from shared.perf_model import PerfModel
from shared.schemas import AdapterInfo, RequestLoad, WorkerState
from shared.schemas.worker_state import AssistState
from shared.schemas.names import request_key

RANKS = {"a8": 8, "b16": 16, "c32": 32, "d64": 64}


def _perf() -> PerfModel:
    decode = {"const": 900.0, "requests": 40.0, "batch_max_rank": 1.5, "tokens": 0.2, "adapters": 15.0}
    prefill = {"const": 2_000.0, "tokens": 9.0, "tokens_max_rank": 0.05, "tokens_sq": 0.01}
    cold = {"host": {"const": 300.0, "sum_rank": 20.0}, "disk": {"const": 3_000.0, "sum_rank": 80.0}}
    return PerfModel.from_coefficients("bgmv", decode, prefill, cold)


def _own_perf() -> PerfModel:
    """A worker's own model, unlike the reference: slower decode, cheap cold starts."""
    decode = {"const": 2_500.0, "requests": 90.0, "batch_max_rank": 6.0, "tokens": 0.5, "adapters": 40.0}
    prefill = {"const": 1_000.0, "tokens": 4.0, "tokens_max_rank": 0.02, "tokens_sq": 0.01}
    cold = {"host": {"const": 50.0, "sum_rank": 2.0}, "disk": {"const": 400.0, "sum_rank": 9.0}}
    return PerfModel.from_coefficients("mbgmv", decode, prefill, cold)


OWN_DIGEST = "0123456789abcdef"


def _state(worker_id: str, seq: int, rng: random.Random, own: bool = False) -> WorkerState:
    def loads(n: int, tag: str) -> list[RequestLoad]:
        names = [rng.choice([None, *RANKS]) for _ in range(n)]
        return [RequestLoad(key=request_key(f"{worker_id}-{tag}{seq}-{i}"), adapter=a, rank=RANKS.get(a, 0),
                            prompt_tokens=rng.randint(1, 60), generated_tokens=rng.randint(0, 30))
                for i, a in enumerate(names)]
    adapters = [AdapterInfo(name=a, rank=r, level=rng.choice(LEVELS)) for a, r in RANKS.items()]
    return WorkerState(worker_id=worker_id, model="m", backend="bgmv", running=loads(rng.randint(0, 6), "r"),
                       queued=loads(rng.randint(0, 2), "q"), adapters=adapters, free_kv_blocks=rng.randint(0, 40),
                       total_kv_blocks=40, max_batch_size=8, max_model_len=512, seq=seq, timestamp=1000.0 + seq,
                       profile=OWN_DIGEST if own and worker_id == "w1" else "",
                       assist=AssistState(pool_workers=2, pool_alive=2, pool_healthy=True)
                       if own and worker_id == "w2" else None)


def _drive(policy, path, decisions: int = 150, seed: int = 3, own: bool = False):
    """Route random requests through a fleet of 3 workers whose states arrive now and then;
    log each decision; return the live decode-cost what-ifs per decision and worker, and the log's path.
    ``own``: w1 publishes its own profile (priced with _own_perf) and w2 has a CPU prefill pool."""
    models = {OWN_DIGEST: _own_perf()} if own else {}
    rng, perf = random.Random(seed), _perf()
    fleet = Fleet(dead_after_s=1e9, pending_ttl_s=1e9, perf_of=models.get)
    log = DecisionLog.open(str(path), "sched-1", policy)
    seqs = {w: 1 for w in ("w0", "w1", "w2")}
    for w in seqs:
        fleet.observe(_state(w, 1, rng, own), 0.0)
    live_costs = []
    for i in range(decisions):
        now = 0.01 * i
        if rng.random() < 0.2:
            w = rng.choice(list(seqs))
            seqs[w] += 1
            fleet.observe(_state(w, seqs[w], rng, own), now)
        adapter = rng.choice([None, *RANKS])
        request = PolicyRequest(RANKS.get(adapter, 0), rng.randint(1, 80), adapter)
        records = fleet.live(now)
        choice = policy.choose([r.view for r in records], request)
        live_costs.append([perf.decode_us_with(r.view.total, request.rank, request.prompt_tokens, adapter)
                           for r in records])
        log.record(f"req-{i}", 0, request, records, (), choice, now, 1e-5)
        if isinstance(choice, str):
            fleet.reserve(choice, RequestLoad(key=request_key(f"req-{i}"), adapter=adapter, rank=request.rank,
                                              prompt_tokens=request.prompt_tokens), now)
    log.close()
    return live_costs, log.path


@pytest.mark.parametrize("name", ["rank_aware", "round_robin", "least_loaded", "adapter_affinity", "first_fit"])
def test_replayed_decisions_equal_the_logged_ones(name, tmp_path):
    config = PolicyConfig(policy=name, slo_ms=3.0)
    live_costs, path = _drive(make_policy(config, _perf()), tmp_path / "{name}.jsonl")
    assert path == tmp_path / "sched-1.jsonl"
    header, decisions = read_log(path)
    assert header.policy == config and header.scheduler == "sched-1" and len(decisions) == 150
    assert not replay(header.make_policy(_perf()), decisions)
    perf = _perf()
    for decision, costs in zip(decisions, live_costs):
        views = decision.views()
        req = decision.request
        assert [perf.decode_us_with(v.total, req.rank, req.prompt_tokens, req.adapter) for v in views] == costs
    assert {d.choice for d in decisions} >= {"w0", "w1"}
    assert any(d.pending for d in decisions)


def test_replay_prices_each_worker_as_the_scheduler_did(tmp_path):
    """A worker's own profile and its CPU prefill pool are logged, so the replay reproduces decisions
    that pricing every worker with the reference model and no pool would not."""
    policy = make_policy(PolicyConfig(policy="rank_aware", slo_ms=3.0), _perf())
    _drive(policy, tmp_path / "log.jsonl", own=True)
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["digest"] for e in lines if e["type"] == "profile"] == [OWN_DIGEST]  # once, before its first use
    header, decisions = read_log(tmp_path / "log.jsonl")
    assert not replay(header.make_policy(_perf()), decisions)
    snapshots = {w["worker_id"]: w for w in lines[-1]["workers"]}
    assert (snapshots["w1"]["profile"], snapshots["w2"]["assist_cores"]) == (OWN_DIGEST, 2)
    blind = [dataclasses.replace(d, models=(None,) * len(d.workers),
                                 workers=tuple({**w, "assist_cores": 0} for w in d.workers)) for d in decisions]
    assert replay(header.make_policy(_perf()), blind)


def test_a_profile_used_before_its_line_is_refused(tmp_path):
    _drive(make_policy(PolicyConfig(policy="rank_aware", slo_ms=3.0), _perf()), tmp_path / "log.jsonl", own=True)
    lines = [line for line in (tmp_path / "log.jsonl").read_text().splitlines() if '"type":"profile"' not in line]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DecisionLogError, match="before its profile line"):
        read_log(tmp_path / "log.jsonl")


def test_a_wrong_logged_choice_is_reported(tmp_path):
    policy = make_policy(PolicyConfig(policy="rank_aware", slo_ms=3.0), _perf())
    _drive(policy, tmp_path / "log.jsonl", decisions=40)
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    entry = json.loads(lines[20])
    entry["choice"] = next(w["worker_id"] for w in entry["workers"] if w["worker_id"] != entry["choice"])
    lines[20] = json.dumps(entry)
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    header, decisions = read_log(tmp_path / "log.jsonl")
    mismatches = replay(header.make_policy(_perf()), decisions)
    assert [(m.index, m.request_id) for m in mismatches] == [(19, entry["request_id"])]


def test_summary_round_trip_and_consistency():
    stats = BatchStats.from_requests([8, 64, 64, 0, 16], [5, 9, 1, 30, 2], ["a", "b", "b", None, None])
    rebuilt = stats_from_summary(json.loads(json.dumps(stats_summary(stats))))
    assert stats_summary(rebuilt) == stats_summary(stats)
    assert rebuilt.has_adapter("b") and not rebuilt.has_adapter("c")
    bad = stats_summary(stats) | {"max_rank": 32}
    with pytest.raises(DecisionLogError, match="max_rank"):
        stats_from_summary(bad)
    with pytest.raises(DecisionLogError, match="adapter uses"):
        stats_from_summary(stats_summary(stats) | {"adapter_counts": {"a": 9}})


def test_lag_summary_counts_pending_and_ages(tmp_path):
    _drive(make_policy(PolicyConfig(policy="least_loaded")), tmp_path / "log.jsonl", decisions=60)
    _, decisions = read_log(tmp_path / "log.jsonl")
    summary = lag_summary(decisions)
    assert summary["decisions"] == 60 and summary["worker_views"] == 180
    assert summary["decisions_with_pending"] == sum(1 for d in decisions if d.pending) > 0
    ages = sorted(w["age_s"] * 1e3 for d in decisions for w in d.workers)
    assert summary["state_age_ms"]["max"] == ages[-1] and 0 <= summary["state_age_ms"]["p50"] <= ages[-1]


def test_bad_logs_are_rejected_with_the_line(tmp_path):
    assert SchedulerConfig().decision_log == ""  # off by default
    path = tmp_path / "log.jsonl"
    _drive(make_policy(PolicyConfig(policy="least_loaded")), path, decisions=3)
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DecisionLogError, match=r"log.jsonl:5"):
        read_log(path)
    path.write_text('{"type": "decision"}\n')
    with pytest.raises(DecisionLogError, match=r":1: "):
        read_log(path)
    with pytest.raises(DecisionLogError, match="cannot read"):
        read_log(tmp_path / "missing.jsonl")
    (tmp_path / "file").write_text("")
    with pytest.raises(DecisionLogError, match="cannot open"):
        DecisionLog.open(str(tmp_path / "file" / "log.jsonl"), "s", make_policy(PolicyConfig(policy="random")))


def test_a_failing_write_turns_the_log_off():
    log = DecisionLog.open("/dev/full", "s", make_policy(PolicyConfig(policy="random")))
    assert not log.enabled
    log.record("r", 0, PolicyRequest(8, 4, "a"), [], (), "w0", 0.0, 0.0)
    assert log.written == 0
