"""The restart policy: exponential backoff, reset after a stable run, failed starts retried."""

from __future__ import annotations

import logging
import socket

import pytest

from launcher.supervisor import Backoff, RestartPolicy, Supervisor
from shared.config import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Process:
    """A child whose exits and start failures the test decides."""

    def __init__(self, name: str = "gpu_worker-0") -> None:
        self.name = name
        self.status: int | None = None
        self.starts = 0
        self.fail_starts = 0

    def start(self) -> None:
        if self.fail_starts:
            self.fail_starts -= 1
            raise OSError("port in use")
        self.starts += 1
        self.status = None

    def poll(self) -> int | None:
        return self.status


def test_backoff_doubles_up_to_the_cap_and_resets_after_a_stable_run():
    backoff = Backoff(RestartPolicy(initial_s=0.5, factor=2, max_s=4, stable_s=60))
    assert [backoff.delay(uptime_s=1) for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    assert backoff.delay(uptime_s=60) == 0.5  # it stayed up long enough: start over
    assert backoff.delay(uptime_s=0.1) == 1


def test_restart_policy_is_validated():
    with pytest.raises(ConfigError):
        RestartPolicy(initial_s=0)
    with pytest.raises(ConfigError):
        RestartPolicy(initial_s=5, max_s=1)


def test_a_dead_child_is_restarted_after_its_backoff_with_one_log_line(caplog):
    clock, child = Clock(), Process()
    supervisor = Supervisor(RestartPolicy(initial_s=0.5, max_s=30), clock)
    supervisor.add(child)
    supervisor.check()
    assert child.starts == 0  # alive: nothing to do
    child.status = -9
    clock.now += 1
    with caplog.at_level(logging.WARNING, logger="launcher.supervisor"):
        supervisor.check()
        supervisor.check()
    assert [r.getMessage() for r in caplog.records] == ["gpu_worker-0 exited with status -9; restart 1 in 0.5 s"]
    assert child.starts == 0  # waits out the backoff first
    clock.now += 0.5
    supervisor.check()
    assert child.starts == 1 and supervisor.restarts("gpu_worker-0") == 1

    child.status = 1  # dies again at once: the next wait doubles
    clock.now += 0.1
    supervisor.check()
    clock.now += 0.9
    supervisor.check()
    assert child.starts == 1
    clock.now += 0.1
    supervisor.check()
    assert child.starts == 2


def test_a_failed_start_is_retried_with_a_longer_wait():
    clock, child = Clock(), Process("nats-server")
    supervisor = Supervisor(RestartPolicy(initial_s=0.5, max_s=30), clock)
    supervisor.add(child)
    child.status, child.fail_starts = -9, 1
    supervisor.check()
    clock.now += 0.5
    supervisor.check()  # the start fails: retried after 1 s
    assert child.starts == 0
    clock.now += 0.9
    supervisor.check()
    assert child.starts == 0
    clock.now += 0.1
    supervisor.check()
    assert child.starts == 1 and child.poll() is None


def test_only_the_dead_child_is_restarted():
    clock = Clock()
    supervisor = Supervisor(RestartPolicy(initial_s=0.5), clock)
    alive, dead = Process("gateway"), Process("scheduler-0")
    supervisor.add(alive)
    supervisor.add(dead)
    dead.status = -9
    supervisor.check()
    clock.now += 1
    supervisor.check()
    assert (alive.starts, dead.starts) == (0, 1)


def test_a_killed_nats_server_restarts_on_the_same_port():
    from launcher.local_stack import NatsChild
    from shared.nats_server import NatsServer, NatsServerConfig

    with NatsServer(NatsServerConfig(port=0)) as server:
        child, url = NatsChild(server), server.url
        server.kill()
        assert child.poll() == -9
        child.start()
        assert child.poll() is None and server.url == url
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
