"""The control messages between a gpu_worker and its CPU prefill pool (``cpu_prefill.<id>.*``).

Activations never travel here: they go through the shared-memory ring (``shared/shm_exchange.py``).
A pool sends :class:`PoolHello` when it starts and :class:`PoolHeartbeat` every
``heartbeat_s`` after that; the worker answers both with :class:`PoolWelcome`, naming the ring
to attach. A hello whose version or model geometry differs from the worker's is refused with
an ``invalid_request`` error whose message says what differs.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.schemas.wire import Message, spec
from shared.schemas.names import WORKER_ID_PATTERN

RING_NAME_PATTERN = r"caraserve-[A-Za-z0-9_-]{1,64}-[0-9]{1,10}-ring"


@dataclass(kw_only=True)
class PoolHello(Message):
    """A pool of ``workers`` CPU processes for worker ``worker_id``, built for this model geometry."""

    KIND = "pool_hello"
    worker_id: str = spec(pattern=WORKER_ID_PATTERN)
    pid: int = spec(ge=1)
    exchange_version: int = spec(ge=1, le=1_000_000)
    num_layers: int = spec(ge=1, le=100_000)
    hidden_size: int = spec(ge=1, le=1_000_000)
    intermediate_size: int = spec(ge=1, le=1_000_000)
    num_heads: int = spec(ge=1, le=100_000)
    num_kv_heads: int = spec(ge=1, le=100_000)
    head_dim: int = spec(ge=1, le=100_000)
    workers: int = spec(ge=0, le=256)


@dataclass(kw_only=True)
class PoolHeartbeat(Message):
    """The pool is alive: ``alive`` of its ``workers`` processes run, attached to ``ring``."""

    KIND = "pool_heartbeat"
    worker_id: str = spec(pattern=WORKER_ID_PATTERN)
    pid: int = spec(ge=1)
    ring: str = spec(pattern=RING_NAME_PATTERN)
    workers: int = spec(ge=0, le=256)
    alive: int = spec(ge=0, le=256)
    jobs: int = spec(0, ge=0)


@dataclass(kw_only=True)
class PoolWelcome(Message):
    """The worker's answer: the ring to attach and how many CPU processes it expects."""

    KIND = "pool_welcome"
    worker_id: str = spec(pattern=WORKER_ID_PATTERN)
    ring: str = spec(pattern=RING_NAME_PATTERN)
    workers: int = spec(ge=1, le=256)
    heartbeat_s: float = spec(0.5, ge=0.01, le=60.0)
