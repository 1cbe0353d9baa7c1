"""The scheduler's fleet view: liveness, pending routes and how states settle them (no network)."""

from __future__ import annotations

from services.scheduler.fleet import Fleet
from shared.schemas import AdapterInfo, RequestLoad, RouteRequest, Sampling, WorkerState
from shared.schemas.names import request_key


def state(seq: int, running=(), worker_id="w0", **kwargs) -> WorkerState:
    return WorkerState(worker_id=worker_id, model="m", backend="bgmv", max_batch_size=8, max_model_len=100,
                       running=[RequestLoad(key=request_key(r), rank=8, prompt_tokens=4) for r in running], seq=seq,
                       **kwargs)


def load(request_id: str) -> RequestLoad:
    return RequestLoad(key=request_key(request_id), rank=8, prompt_tokens=4, remaining_tokens=4)


def route(prompt: int = 4, max_tokens: int = 4, adapter: str | None = None) -> RouteRequest:
    return RouteRequest(request_id="r", model="m", adapter=adapter, prompt_token_ids=[1] * prompt,
                        sampling=Sampling(max_tokens=max_tokens), reply_inbox="i")


def test_liveness_follows_heartbeats():
    fleet = Fleet(dead_after_s=1.0, pending_ttl_s=5.0)
    assert fleet.observe(state(1), now=0.0) is True
    assert fleet.observe(state(2), now=0.5) is False
    assert fleet.is_live("w0", 1.4) and not fleet.is_live("w0", 1.6)
    assert fleet.expire(1.6) == ["w0"] and len(fleet) == 0
    assert fleet.observe(state(3), now=2.0) is True  # back to life


def test_pending_routes_count_until_a_later_state_accounts_for_them():
    fleet = Fleet(dead_after_s=10.0, pending_ttl_s=5.0)
    fleet.observe(state(1), 0.0)
    fleet.reserve("w0", load("a"), 0.0)
    fleet.reserve("w0", load("b"), 0.0)
    fleet.confirm("w0", "a", state_seq=1)
    fleet.confirm("w0", "b", state_seq=1)
    assert fleet.get("w0").view.load == 2
    fleet.observe(state(2, running=["a"]), 0.1)  # shows a; b finished before this state was taken
    record = fleet.get("w0")
    assert not record.pending and record.view.load == 1 and record.view.running.count == 1


def test_unconfirmed_pending_routes_expire_and_restarts_forget_them():
    fleet = Fleet(dead_after_s=100.0, pending_ttl_s=5.0)
    fleet.observe(state(5), 0.0)
    fleet.reserve("w0", load("a"), 0.0)
    fleet.observe(state(6), 1.0)
    assert request_key("a") in fleet.get("w0").pending  # no ack yet, not shown, young: still counted
    fleet.observe(state(7), 6.0)
    assert not fleet.get("w0").pending  # older than the TTL
    fleet.reserve("w0", load("b"), 6.0)
    fleet.observe(state(1), 6.1)  # seq went back: the worker restarted
    assert not fleet.get("w0").pending and fleet.get("w0").view.load == 0


def test_candidates_need_model_adapter_and_context_room():
    fleet = Fleet(dead_after_s=10.0, pending_ttl_s=5.0)
    fleet.observe(state(1, worker_id="plain"), 0.0)
    fleet.observe(state(1, worker_id="lora", adapters=[AdapterInfo(name="sql", rank=16, level="disk")]), 0.0)
    assert {r.worker_id for r in fleet.candidates(route(), 0.0)} == {"plain", "lora"}
    assert [r.worker_id for r in fleet.candidates(route(adapter="sql"), 0.0)] == ["lora"]
    assert [r.worker_id for r in fleet.candidates(route(), 0.0, exclude=["plain"])] == ["lora"]
    assert fleet.candidates(route(prompt=90, max_tokens=20), 0.0) == []  # 110 tokens > max_model_len 100
    assert fleet.rank_of("sql") == 16 and fleet.rank_of(None) == 0
    assert fleet.get("lora").view.residency("sql") == "disk"


def test_a_new_instance_of_a_worker_forgets_its_pending_routes():
    fleet = Fleet(dead_after_s=100.0, pending_ttl_s=5.0)
    fleet.observe(state(5, instance="aa"), 0.0)
    fleet.reserve("w0", load("a"), 0.0)
    fleet.observe(state(9, instance="bb"), 0.1)  # restarted, and its seq happens to be larger
    assert not fleet.get("w0").pending
