"""Fixtures for service tests: a real nats-server on a random loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from shared.nats_server import NatsServer, NatsServerConfig


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A fresh nats-server subprocess on a free 127.0.0.1 port (stopped after the test)."""
    with NatsServer(NatsServerConfig()) as server:
        yield server
