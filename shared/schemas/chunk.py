"""What streams back to a request's reply inbox: Chunk (with Usage and, on failure, ErrorInfo)."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from shared.schemas.errors import ErrorInfo
from shared.schemas.names import RequestId, WorkerId, whole
from shared.schemas.schema_error import field_path
from shared.schemas.wire import Message, NonNegativeFloat, NonNegativeInt, SchemaError, Struct, default

FINISH_REASONS = ("stop", "length", "error", "cancelled")
CANCEL_TOKEN_PATTERN = r"[A-Za-z0-9_-]{16,128}"

CancelToken = Annotated[str, Meta(pattern=whole(CANCEL_TOKEN_PATTERN))]
LayerCount = Annotated[int, Meta(ge=0, le=100_000)]
TokenId = NonNegativeInt


class PrefillLoraUsage(Struct):
    """How a LoRA request's prefill got its deltas: layers the CPU prefill pool computed
    (CPU-assisted cold start), layers computed on the device, and how long it waited for its
    adapter to load before that prefill."""

    cpu_layers: LayerCount = default(0)
    device_layers: LayerCount = default(0)
    waited_ms: NonNegativeFloat = default(0.0)


class Usage(Struct):
    """Token counts of a finished request (OpenAI ``usage``), and for a LoRA request ``prefill_lora``."""

    prompt_tokens: NonNegativeInt
    completion_tokens: NonNegativeInt
    total_tokens: NonNegativeInt
    prefill_lora: PrefillLoraUsage | None = None

    def check(self, path: str = "") -> None:
        if self.total_tokens != self.prompt_tokens + self.completion_tokens:
            raise SchemaError("total_tokens must equal prompt_tokens + completion_tokens", path)


class Chunk(Message):
    """One streamed piece of a request's output.

    ``index`` counts this request's chunks from 0. ``token_ids`` are the tokens generated
    since the previous chunk and ``text`` their detokenized text. The final chunk, and only
    it, has ``finish_reason``; a final chunk with ``finish_reason == "error"`` carries
    ``error``. ``usage`` accompanies the final chunk. ``worker_id`` names the gpu_worker that
    produced the chunk (None from the scheduler and the gateway): a gateway relays only the
    chunks of the worker its request was placed on. ``cancel_token`` comes in the first chunk
    the gateway sends the requester, and only there: a CancelRequest carrying it cancels the
    request (it is how a NATS client without an API key proves the request is its own).
    """

    KIND = "chunk"
    request_id: RequestId
    index: NonNegativeInt
    token_ids: list[TokenId] = default([])
    text: str = default("")
    finish_reason: Literal[FINISH_REASONS] | None = None
    usage: Usage | None = None
    error: ErrorInfo | None = None
    worker_id: WorkerId | None = None
    cancel_token: CancelToken | None = None

    @property
    def final(self) -> bool:
        return self.finish_reason is not None

    def check(self, path: str = "") -> None:
        if (self.finish_reason == "error") != (self.error is not None):
            raise SchemaError("error must be present exactly when finish_reason is 'error'", path)
        if self.usage is not None:
            self.usage.check(field_path(path, "usage"))
