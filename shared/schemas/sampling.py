"""Sampling parameters as they travel from the gateway to the scheduler and the worker."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from shared.schemas.wire import SchemaError, Struct, default

MAX_STOP_SEQUENCES = 16
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Counts (max_tokens, top_k) are bounded so that no client-chosen int overflows msgpack's 64 bits
# or a torch argument; anything this large is refused by the context length or clamped to the
# vocabulary long before the bound matters.
MAX_COUNT = 2**31 - 1

# The sampling fields, shared with the public GenerateRequest.
MaxTokens = Annotated[int, Meta(ge=1, le=MAX_COUNT)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TopK = Annotated[int, Meta(ge=-1, le=MAX_COUNT)]
Seed = Annotated[int, Meta(ge=INT64_MIN, le=INT64_MAX)]
BoundedTokenId = Annotated[int, Meta(ge=0, le=MAX_COUNT)]


def check_stop(stop: list[str], path: str) -> None:
    """Stop sequences: at most MAX_STOP_SEQUENCES non-empty strings."""
    if len(stop) > MAX_STOP_SEQUENCES:
        raise SchemaError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stop)}", path)
    if any(not s for s in stop):
        raise SchemaError("stop sequences must be non-empty", path)


class Sampling(Struct):
    """How to sample (OpenAI/vLLM semantics; temperature 0 is greedy, top_k 0 or -1 is off)."""

    max_tokens: MaxTokens
    temperature: Temperature = default(1.0)
    top_p: TopP = default(1.0)
    top_k: TopK = default(0)
    seed: Seed | None = None
    stop: list[str] = default([])
    stop_token_ids: list[BoundedTokenId] = default([])
    ignore_eos: bool = default(False)

    def check(self, path: str = "") -> None:
        check_stop(self.stop, f"{path}.stop" if path else "stop")
