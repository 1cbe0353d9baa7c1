"""Fixtures for service tests: a real nats-server on a random loopback port."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest

from shared.nats_server import NatsServer, NatsServerConfig


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A fresh nats-server subprocess on a free 127.0.0.1 port (stopped after the test)."""
    with NatsServer(NatsServerConfig()) as server:
        yield server


@pytest.fixture
async def stack() -> AsyncIterator[contextlib.AsyncExitStack]:
    """Services and clients started in a test are stopped, in reverse order, after it."""
    async with contextlib.AsyncExitStack() as st:
        yield st
