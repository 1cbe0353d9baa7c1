"""What a worker publishes on ``state.<id>`` at ~10 Hz and on every admission or finish."""

from __future__ import annotations

from dataclasses import dataclass

from shared.schemas.adapters import AdapterInfo
from shared.schemas.names import (INSTANCE_PATTERN, NAME_PATTERN, PROFILE_STATUS_PATTERN, REQUEST_KEY_PATTERN,
                                  WORKER_ID_PATTERN)
from shared.schemas.wire import Message, SchemaError, Struct, spec


@dataclass
class RequestLoad(Struct):
    """A request a worker holds: its key, its adapter (None for the base model) and token counts.

    ``key`` is :func:`shared.schemas.names.request_key` of the request id, never the id itself:
    states are read by every service, and an id would let any reader act on the request.
    The request's current context is ``prompt_tokens + generated_tokens``; it will generate at
    most ``remaining_tokens`` more.
    """

    key: str = spec(pattern=REQUEST_KEY_PATTERN)
    adapter: str | None = spec(None, pattern=NAME_PATTERN)
    rank: int = spec(0, ge=0, le=1024)
    prompt_tokens: int = spec(0, ge=0)
    generated_tokens: int = spec(0, ge=0)
    remaining_tokens: int = spec(0, ge=0)

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens


@dataclass
class AssistState(Struct):
    """CPU-assisted prefill on a worker (cold-start mode cpu_assist): counters and the pool's health.

    ``assisted``: requests admitted with CPU-computed deltas; ``fallbacks``: those that fell back
    to waiting for their load; ``cpu_layers``: (request, layer) deltas the pool computed;
    ``pool_workers`` / ``pool_alive``: the pool's size and its processes alive at the last heartbeat.
    """

    assisted: int = spec(0, ge=0)
    fallbacks: int = spec(0, ge=0)
    cpu_layers: int = spec(0, ge=0)
    pool_workers: int = spec(0, ge=0, le=256)
    pool_alive: int = spec(0, ge=0, le=256)
    pool_healthy: bool = False


@dataclass
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
    worker_id: str = spec(pattern=WORKER_ID_PATTERN)
    model: str = spec(min_len=1, max_len=256)
    backend: str = spec(min_len=1, max_len=64)
    running: list[RequestLoad] = spec(default_factory=list)
    queued: list[RequestLoad] = spec(default_factory=list)
    adapters: list[AdapterInfo] = spec(default_factory=list)
    free_kv_blocks: int = spec(0, ge=0)
    total_kv_blocks: int = spec(0, ge=0)
    block_size: int = spec(16, ge=1)
    max_batch_size: int = spec(1, ge=1)
    max_queued: int = spec(0, ge=0)
    max_model_len: int = spec(1, ge=1)
    seq: int = spec(0, ge=0)
    timestamp: float = spec(0.0, ge=0.0)
    instance: str = spec("", pattern=INSTANCE_PATTERN)
    assist: AssistState | None = None  # cpu_assist mode only
    profile: str = spec("", pattern=PROFILE_STATUS_PATTERN)

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
