"""What a worker publishes on ``state.<id>`` at ~10 Hz and on every admission or finish."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from shared.schemas.adapters import AdapterInfo
from shared.schemas.names import Instance, ModelName, Name, ProfileStatus, RequestKey, WorkerId
from shared.schemas.wire import Message, NonNegativeFloat, NonNegativeInt, SchemaError, Struct, default

Rank = Annotated[int, Meta(ge=0, le=1024)]
Processes = Annotated[int, Meta(ge=0, le=256)]
Positive = Annotated[int, Meta(ge=1)]


class RequestLoad(Struct):
    """A request a worker holds: its key, its adapter (None for the base model) and token counts.

    ``key`` is :func:`shared.schemas.names.request_key` of the request id, never the id itself:
    states are read by every service, and an id would let any reader act on the request.
    The request's current context is ``prompt_tokens + generated_tokens``; it will generate at
    most ``remaining_tokens`` more.
    """

    key: RequestKey
    adapter: Name | None = None
    rank: Rank = default(0)
    prompt_tokens: NonNegativeInt = default(0)
    generated_tokens: NonNegativeInt = default(0)
    remaining_tokens: NonNegativeInt = default(0)

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens


class AssistState(Struct):
    """CPU-assisted prefill on a worker (cold-start mode cpu_assist): counters and the pool's health.

    ``assisted``: requests admitted with CPU-computed deltas; ``fallbacks``: those that fell back
    to waiting for their load; ``cpu_layers``: (request, layer) deltas the pool computed;
    ``pool_workers`` / ``pool_alive``: the pool's size and its processes alive at the last heartbeat.
    """

    assisted: NonNegativeInt = default(0)
    fallbacks: NonNegativeInt = default(0)
    cpu_layers: NonNegativeInt = default(0)
    pool_workers: Processes = default(0)
    pool_alive: Processes = default(0)
    pool_healthy: bool = default(False)


class WorkerState(Message):
    """A worker's load and residency, numbered by ``seq`` (increasing per worker).

    ``adapters`` lists every adapter the worker can serve, with the tier it is in now: the
    scheduler only routes an adapter's requests to workers that list it. The worker holds at
    most ``max_batch_size`` running plus ``max_queued`` queued requests and refuses more
    (``overloaded``). ``instance`` is chosen once per process start, so a restarted worker
    with the same id is told apart (and its ``seq`` starts over).

    ``profile`` is the worker's performance profile: ``pending`` while it is being made,
    ``failed`` when it could not be made, else the profile's digest, whose full text the
    worker serves on ``worker.<id>.profile`` (:class:`~shared.schemas.profile.ProfileRequest`);
    "" from a worker that keeps no profile.
    """

    KIND = "worker_state"
    worker_id: WorkerId
    model: ModelName
    backend: Annotated[str, Meta(min_length=1, max_length=64)]
    running: list[RequestLoad] = default([])
    queued: list[RequestLoad] = default([])
    adapters: list[AdapterInfo] = default([])
    free_kv_blocks: NonNegativeInt = default(0)
    total_kv_blocks: NonNegativeInt = default(0)
    block_size: Positive = default(16)
    max_batch_size: Positive = default(1)
    max_queued: NonNegativeInt = default(0)
    max_model_len: Positive = default(1)
    seq: NonNegativeInt = default(0)
    timestamp: NonNegativeFloat = default(0.0)
    instance: Instance = default("")
    assist: AssistState | None = None  # cpu_assist mode only
    profile: ProfileStatus = default("")

    def check(self, path: str = "") -> None:
        if self.free_kv_blocks > self.total_kv_blocks:
            raise SchemaError("free_kv_blocks must not exceed total_kv_blocks", path)

    def request_keys(self) -> set[str]:
        """Keys of every running or queued request (see :func:`shared.schemas.names.request_key`)."""
        return {r.key for r in self.running} | {r.key for r in self.queued}

    @property
    def capacity(self) -> int:
        """How many requests this worker holds at most, running and queued."""
        return self.max_batch_size + self.max_queued
