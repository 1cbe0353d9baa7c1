"""The control messages between a gpu_worker and its CPU prefill pool (``cpu_prefill.<id>.*``).

Activations never travel here: they go through the shared-memory ring (``shared/shm_exchange.py``).
A pool sends :class:`PoolHello` when it starts and :class:`PoolHeartbeat` every
``heartbeat_s`` after that; the worker answers both with :class:`PoolWelcome`, naming the ring
to attach. A hello whose version or model geometry differs from the worker's is refused with
an ``invalid_request`` error whose message says what differs.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from shared.schemas.names import WorkerId, whole
from shared.schemas.wire import Message, NonNegativeInt, default

RING_NAME_PATTERN = r"caraserve-[A-Za-z0-9_-]{1,64}-[0-9]{1,10}-ring"

RingName = Annotated[str, Meta(pattern=whole(RING_NAME_PATTERN))]
Pid = Annotated[int, Meta(ge=1)]
Dimension = Annotated[int, Meta(ge=1, le=1_000_000)]
Count = Annotated[int, Meta(ge=1, le=100_000)]
Processes = Annotated[int, Meta(ge=0, le=256)]


class PoolHello(Message, kw_only=True):
    """A pool of ``workers`` CPU processes for worker ``worker_id``, built for this model geometry."""

    KIND = "pool_hello"
    worker_id: WorkerId
    pid: Pid
    exchange_version: Annotated[int, Meta(ge=1, le=1_000_000)]
    num_layers: Count
    hidden_size: Dimension
    intermediate_size: Dimension
    num_heads: Count
    num_kv_heads: Count
    head_dim: Count
    workers: Processes


class PoolHeartbeat(Message, kw_only=True):
    """The pool is alive: ``alive`` of its ``workers`` processes run, attached to ``ring``."""

    KIND = "pool_heartbeat"
    worker_id: WorkerId
    pid: Pid
    ring: RingName
    workers: Processes
    alive: Processes
    jobs: NonNegativeInt = default(0)


class PoolWelcome(Message, kw_only=True):
    """The worker's answer: the ring to attach and how many CPU processes it expects."""

    KIND = "pool_welcome"
    worker_id: WorkerId
    ring: RingName
    workers: Annotated[int, Meta(ge=1, le=256)]
    heartbeat_s: Annotated[float, Meta(ge=0.01, le=60.0)] = default(0.5)
