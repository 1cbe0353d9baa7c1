"""The gateway's liveness rules for placed requests, on a fake clock (no network)."""

from __future__ import annotations

from services.gateway.worker_watch import Heartbeat, Placement, WorkerWatch

TIMEOUT_S = 1.0
GRACE_S = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Fleet:
    """A watch on a fake clock, and the requests it reported lost."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.watch = WorkerWatch(TIMEOUT_S, GRACE_S, self.clock)
        self.lost: list[str] = []

    def beat(self, worker: str, seq: int, keys: tuple[str, ...] = (), instance: str = "a", slots: int = 8) -> None:
        self.watch.observe(Heartbeat(worker, seq, instance, frozenset(keys), slots))

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
