"""What a worker publishes on ``state.<id>`` at ~10 Hz and on every admission or finish."""

from __future__ import annotations

from dataclasses import dataclass

from shared.schemas.adapters import AdapterInfo
from shared.schemas.names import NAME_PATTERN, REQUEST_ID_PATTERN, WORKER_ID_PATTERN
from shared.schemas.wire import Message, SchemaError, Struct, spec


@dataclass
class RequestLoad(Struct):
    """A request a worker holds: its adapter (None for the base model) and token counts.

    The request's current context is ``prompt_tokens + generated_tokens``; it will generate at
    most ``remaining_tokens`` more.
    """

    request_id: str = spec(pattern=REQUEST_ID_PATTERN)
    adapter: str | None = spec(None, pattern=NAME_PATTERN)
    rank: int = spec(0, ge=0, le=1024)
    prompt_tokens: int = spec(0, ge=0)
    generated_tokens: int = spec(0, ge=0)
    remaining_tokens: int = spec(0, ge=0)

    @property
    def context_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens


@dataclass
class WorkerState(Message):
    """A worker's load and residency, numbered by ``seq`` (increasing per worker).

    ``adapters`` lists every adapter the worker can serve, with the tier it is in now: the
    scheduler only routes an adapter's requests to workers that list it.
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
    max_model_len: int = spec(1, ge=1)
    seq: int = spec(0, ge=0)
    timestamp: float = spec(0.0, ge=0.0)

    def check(self, path: str = "") -> None:
        if self.free_kv_blocks > self.total_kv_blocks:
            raise SchemaError("free_kv_blocks must not exceed total_kv_blocks", path)

    def request_ids(self) -> set[str]:
        """Ids of every running or queued request."""
        return {r.request_id for r in self.running} | {r.request_id for r in self.queued}
