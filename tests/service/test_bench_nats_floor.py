"""The control-plane benchmark's transport floor: real relays over a real nats-server."""

from __future__ import annotations

import pytest

from bench.control_plane.nats_floor import measure_floor

pytestmark = pytest.mark.timeout(120)


def test_floor_times_every_round_trip_through_the_relays():
    ms = measure_floor(requests=20, warmup=2)
    assert len(ms) == 20 and all(0 < x < 10_000 for x in ms)
