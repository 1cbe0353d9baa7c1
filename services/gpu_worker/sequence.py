"""A request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from services.gpu_worker.request import PrefillLora, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # not yet prefilled (new, or preempted and to be recomputed)
    RUNNING = "running"  # has KV blocks, decoding
    FINISHED = "finished"


@dataclass
class Sequence:
    """Prompt, generated tokens, sampling state and bookkeeping of one request."""

    request_id: str
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    rank: int = 0
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    generator: torch.Generator | None = None
    detokenizer: object | None = None
    text: str = ""  # all text generated so far
    emitted_chars: int = 0  # how much of ``text`` was streamed
    num_preemptions: int = 0
    scheduled_at: float | None = None  # wall time its prefill was first scheduled
    waiting_since: float | None = None  # monotonic time it first waited for its adapter
    prefill_lora: PrefillLora = field(default_factory=PrefillLora)
    assist_failed: bool = False  # an assisted step fell back: it waits for its load from now on

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining_tokens(self) -> int:
        return self.params.max_tokens - len(self.output_ids)
