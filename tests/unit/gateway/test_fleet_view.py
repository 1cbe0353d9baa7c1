"""The gateway's fleet view on a fake clock (no network): liveness rules for placed requests, capacity,
and the adapter catalog built from the workers' states."""

from __future__ import annotations

import pytest

from services.gateway.fleet_view import FleetView, Heartbeat, Placement
from shared.schemas import AdapterInfo, ServiceError

TIMEOUT_S = 1.0
GRACE_S = 1.0
BASE = "base"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Fleet:
    """A fleet view on a fake clock, and the requests it reported lost."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.watch = FleetView(BASE, TIMEOUT_S, GRACE_S, self.clock)
        self.lost: list[str] = []

    def beat(self, worker: str, seq: int, keys: tuple[str, ...] = (), instance: str = "a", slots: int = 8,
             adapters: tuple[AdapterInfo, ...] = ()) -> None:
        self.watch.observe(Heartbeat(worker, seq, instance, frozenset(keys), slots, adapters=adapters))

    def place(self, key: str, worker: str = "w0", state_seq: int = 0, instance: str = "a") -> int:
        return self.watch.watch(Placement(worker, key, state_seq, instance), lambda: self.lost.append(key))

    def advance(self, seconds: float, *, connected: bool = True) -> None:
        self.clock.now += seconds
        self.watch.sweep(connected)


def test_a_request_queued_for_minutes_on_a_heartbeating_worker_is_not_lost():
    fleet = Fleet()
    fleet.beat("w0", 5)
    fleet.place("r1", state_seq=5)
    for seq in range(6, 3006):  # 300 s of heartbeats at 10 Hz, the request queued all along, no chunk
        fleet.advance(0.1)
        fleet.beat("w0", seq, keys=("r1",))
    assert fleet.lost == []


def test_a_worker_that_stops_heartbeating_loses_its_requests_after_the_timeout():
    fleet = Fleet()
    fleet.beat("w0", 1)
    fleet.place("r1", state_seq=1)
    fleet.advance(0.9)
    assert fleet.lost == []
    fleet.advance(0.2)
    assert fleet.lost == ["r1"]
    fleet.advance(5)
    assert fleet.lost == ["r1"]  # fired once
    assert fleet.watch.live_workers() == []


def test_a_worker_never_heard_from_is_silent_from_the_placement_on():
    fleet = Fleet()
    fleet.place("r1", worker="ghost")
    fleet.advance(0.9)
    assert fleet.lost == []
    fleet.advance(0.2)
    assert fleet.lost == ["r1"]


def test_a_request_the_worker_dropped_is_lost_after_two_states_and_the_grace():
    fleet = Fleet()
    fleet.beat("w0", 10)
    fleet.place("r1", state_seq=10)
    fleet.beat("w0", 10)  # the state the ack referred to: it may omit the request
    fleet.beat("w0", 11)  # omits it: maybe its final chunk is still on its way
    fleet.advance(0.1)
    fleet.beat("w0", 12)  # omits it again, but within the grace
    assert fleet.lost == []
    fleet.advance(GRACE_S)
    fleet.beat("w0", 13)
    assert fleet.lost == ["r1"]


def test_listing_the_request_again_resets_the_dropped_rule():
    fleet = Fleet()
    fleet.place("r1", state_seq=3)
    fleet.beat("w0", 4)
    fleet.advance(0.5)
    fleet.beat("w0", 5, keys=("r1",))
    fleet.advance(0.7)
    fleet.beat("w0", 6)
    fleet.advance(0.2)
    fleet.beat("w0", 7)
    assert fleet.lost == []  # missing for 0.2 s only


def test_a_restarted_worker_loses_its_requests_at_once():
    fleet = Fleet()
    fleet.beat("w0", 40, keys=("r1",))
    fleet.place("r1", state_seq=40, instance="a")
    fleet.place("r2", state_seq=40, instance="")  # the instance unknown: a seq starting over tells
    fleet.beat("w0", 1, instance="b")
    assert sorted(fleet.lost) == ["r1", "r2"]


def test_only_the_watchers_of_the_affected_worker_fire_and_unwatch_stops_them():
    fleet = Fleet()
    fleet.beat("w0", 1)
    fleet.beat("w1", 1)
    fleet.place("on-w0", "w0", 1)
    done = fleet.place("finished", "w1", 1)
    fleet.place("on-w1", "w1", 1)
    fleet.watch.unwatch(done)
    fleet.advance(0.6)
    fleet.beat("w1", 2, keys=("on-w1",))
    fleet.advance(0.6)
    assert fleet.lost == ["on-w0"]


def test_while_the_gateway_is_disconnected_nobody_is_presumed_silent():
    fleet = Fleet()
    fleet.beat("w0", 1)
    fleet.place("r1", state_seq=1)
    for _ in range(30):  # 3 s without NATS: no state can arrive
        fleet.advance(0.1, connected=False)
    fleet.advance(0.5)
    assert fleet.lost == []  # reconnected 0.5 s ago
    fleet.advance(0.6)
    assert fleet.lost == ["r1"]  # reconnected and still no state from w0


def test_capacity_is_the_slots_of_the_live_workers():
    fleet = Fleet()
    fleet.beat("w0", 1, slots=8)
    fleet.advance(0.5)
    fleet.beat("w1", 1, slots=72)
    assert fleet.watch.capacity() == 80
    fleet.advance(0.6)
    assert fleet.watch.capacity() == 72 and fleet.watch.known_workers() == ["w0", "w1"]


def test_a_worker_state_is_read_by_request_key_instance_and_capacity():
    from shared.schemas import RequestLoad, WorkerState
    from shared.schemas.names import request_key

    state = WorkerState(worker_id="w0", model="m", backend="bgmv", max_batch_size=4, max_queued=12, seq=7,
                        instance="ab12", running=[RequestLoad(key=request_key("r1"))],
                        queued=[RequestLoad(key=request_key("r2"))])
    assert Heartbeat.of(state) == Heartbeat("w0", 7, "ab12", frozenset({request_key("r1"), request_key("r2")}), 16,
                                            backend="bgmv", profile="", cpu_prefill="off")


def adapter(name: str, rank: int = 8, level: str = "disk") -> AdapterInfo:
    return AdapterInfo(name=name, rank=rank, level=level)


def test_the_catalog_is_the_adapters_the_workers_states_list_with_their_ranks():
    fleet = Fleet()
    assert fleet.watch.adapters() == [] and fleet.watch.resolve(BASE) is None
    fleet.beat("w0", 1, adapters=(adapter("sql", 8, "device"), adapter("poems", 16)))
    fleet.beat("w1", 1, adapters=(adapter("sql", 8, "host"), adapter("legal", 32)))
    assert [(a.name, a.rank) for a in fleet.watch.adapters()] == [("legal", 32), ("poems", 16), ("sql", 8)]
    assert fleet.watch.resolve("sql") == "sql" and fleet.watch.rank_of("poems") == 16 and fleet.watch.rank_of(None) == 0
    with pytest.raises(ServiceError) as refused:
        fleet.watch.resolve("missing")
    assert refused.value.info.code == "model_not_found"
    assert fleet.watch.holders("sql") == [{"worker": "w0", "level": "device"}, {"worker": "w1", "level": "host"}]


def test_a_state_replaces_its_workers_adapter_list():
    fleet = Fleet()
    fleet.beat("w0", 1, adapters=(adapter("sql"), adapter("poems")))
    fleet.beat("w1", 1, adapters=(adapter("sql"),))
    fleet.beat("w0", 2, adapters=(adapter("poems", level="device"),))  # sql unloaded on w0
    assert fleet.watch.holders("sql") == [{"worker": "w1", "level": "disk"}]
    assert fleet.watch.holders("poems") == [{"worker": "w0", "level": "device"}]
    fleet.beat("w1", 2)  # and on w1: no worker lists it any more
    assert not fleet.watch.has("sql") and [a.name for a in fleet.watch.adapters()] == ["poems"]


def test_a_quiet_workers_adapters_stay_known_but_it_holds_none():
    fleet = Fleet()
    fleet.beat("w0", 1, adapters=(adapter("sql"),))
    fleet.advance(TIMEOUT_S + 0.1)
    assert fleet.watch.live_workers() == [] and fleet.watch.holders("sql") == []
    assert fleet.watch.resolve("sql") == "sql"  # its requests get no_capacity at admission, not 404


def test_forget_drops_an_unloaded_adapter_until_a_worker_lists_it_again():
    fleet = Fleet()
    fleet.beat("w0", 1, adapters=(adapter("sql"),))
    fleet.beat("w1", 1, adapters=(adapter("sql"),))
    fleet.watch.forget("sql")
    assert not fleet.watch.has("sql") and fleet.watch.holders("sql") == []
    fleet.beat("w1", 2, adapters=(adapter("sql"),))  # it was down during the unload
    assert fleet.watch.holders("sql") == [{"worker": "w1", "level": "disk"}]


def test_an_answer_to_a_load_counts_as_the_workers_list_at_once():
    fleet = Fleet()
    fleet.beat("w0", 1)
    fleet.watch.observe_adapters("w0", [adapter("fresh", 4, "host")])
    assert fleet.watch.resolve("fresh") == "fresh" and fleet.watch.rank_of("fresh") == 4
    assert fleet.watch.holders("fresh") == [{"worker": "w0", "level": "host"}]


def test_an_adapter_named_like_the_base_model_is_ignored():
    fleet = Fleet()
    fleet.beat("w0", 1, adapters=(adapter(BASE), adapter("sql")))
    assert [a.name for a in fleet.watch.adapters()] == ["sql"] and not fleet.watch.has(BASE)
    assert fleet.watch.resolve(BASE) is None


def test_an_adapter_keeps_its_created_time_while_listed():
    fleet = Fleet()
    fleet.beat("w0", 1, adapters=(adapter("sql"),))
    created = fleet.watch.adapters()[0].created
    fleet.beat("w0", 2, adapters=(adapter("sql"),))
    fleet.beat("w1", 1, adapters=(adapter("sql"),))
    assert fleet.watch.adapters()[0].created == created and created >= fleet.watch.created
