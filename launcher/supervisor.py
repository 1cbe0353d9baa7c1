"""Keep the stack's processes running: restart one that died, with exponential backoff.

:class:`Backoff` is the restart policy of one process: the first restart waits
``initial_s``, each further one ``factor`` times longer, up to ``max_s``; a process that
stayed up ``stable_s`` counts as healthy again, so its next restart waits ``initial_s``.
:class:`Supervisor` applies it to a set of :class:`Child` processes. It is driven by
:meth:`Supervisor.check`, called every fraction of a second from the launcher's serve loop,
and logs one warning line for each exit and each failed start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from shared.config import option, require

log = logging.getLogger(__name__)


@dataclass
class RestartPolicy:
    """How long to wait before restarting a process that died."""

    initial_s: float = option(0.5, "wait before the first restart")
    factor: float = option(2.0, "each further restart waits this many times longer")
    max_s: float = option(30.0, "longest wait between restarts")
    stable_s: float = option(60.0, "a process up this long is healthy again: its next restart waits initial_s")

    def __post_init__(self) -> None:
        require(self.initial_s > 0, "initial_s must be > 0")
        require(self.factor >= 1, "factor must be >= 1")
        require(self.max_s >= self.initial_s, "max_s must be >= initial_s")
        require(self.stable_s > 0, "stable_s must be > 0")


class Backoff:
    """The delays before successive restarts of one process."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.failures = 0  # exits since the process was last stable

    def delay(self, uptime_s: float) -> float:
        """The wait before restarting a process that exited after ``uptime_s`` seconds up."""
        policy = self.policy
        if uptime_s >= policy.stable_s:
            self.failures = 0
        wait = min(policy.max_s, policy.initial_s * policy.factor ** self.failures)
        self.failures += 1
        return wait


class Child(Protocol):
    """A supervised process."""

    name: str

    def start(self) -> None:
        """(Re)start the process; raises OSError or RuntimeError when it cannot."""

    def poll(self) -> int | None:
        """The exit status once the process ended, None while it runs."""


@dataclass
class _Supervised:
    child: Child
    backoff: Backoff
    started_at: float
    restart_at: float | None = None  # set while the child is down, waiting for its restart
    restarts: int = 0


@dataclass
class Supervisor:
    """Restarts children that exited, each with its own :class:`Backoff`."""

    policy: RestartPolicy = field(default_factory=RestartPolicy)
    clock: Callable[[], float] = time.monotonic
    _children: dict[str, _Supervised] = field(default_factory=dict)

    def add(self, child: Child) -> None:
        """Supervise ``child``, already started by the caller."""
        self._children[child.name] = _Supervised(child, Backoff(self.policy), self.clock())

    def restarts(self, name: str) -> int:
        """How many times ``name`` was restarted."""
        return self._children[name].restarts

    def check(self) -> None:
        """Notice exits and run the restarts that are due; never raises for a child's failure."""
        now = self.clock()
        for entry in self._children.values():
            if entry.restart_at is None:
                status = entry.child.poll()
                if status is not None:
                    self._schedule(entry, now, f"exited with status {status}")
            elif now >= entry.restart_at:
                self._restart(entry)

    def _schedule(self, entry: _Supervised, now: float, why: str) -> None:
        wait = entry.backoff.delay(now - entry.started_at)
        entry.restart_at = now + wait
        log.warning("%s %s; restart %d in %.1f s", entry.child.name, why, entry.restarts + 1, wait)

    def _restart(self, entry: _Supervised) -> None:
        entry.restarts += 1
        entry.started_at = self.clock()
        try:
            entry.child.start()
        except (OSError, RuntimeError) as exc:
            self._schedule(entry, self.clock(), f"failed to start ({exc})")
            return
        entry.restart_at = None
        log.info("%s restarted (restart %d)", entry.child.name, entry.restarts)
