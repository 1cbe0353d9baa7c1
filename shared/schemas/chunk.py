"""What streams back to a request's reply inbox: Chunk (with Usage and, on failure, ErrorInfo)."""

from __future__ import annotations

from dataclasses import dataclass

from shared.schemas.errors import ErrorInfo
from shared.schemas.names import REQUEST_ID_PATTERN, WORKER_ID_PATTERN
from shared.schemas.wire import Message, SchemaError, Struct, spec

FINISH_REASONS = ("stop", "length", "error", "cancelled")
CANCEL_TOKEN_PATTERN = r"[A-Za-z0-9_-]{16,128}"


@dataclass
class PrefillLoraUsage(Struct):
    """How a LoRA request's prefill got its deltas: layers the CPU prefill pool computed
    (CPU-assisted cold start), layers computed on the device, and how long it waited for its
    adapter to load before that prefill."""

    cpu_layers: int = spec(0, ge=0, le=100_000)
    device_layers: int = spec(0, ge=0, le=100_000)
    waited_ms: float = spec(0.0, ge=0.0)


@dataclass
class Usage(Struct):
    """Token counts of a finished request (OpenAI ``usage``), and for a LoRA request ``prefill_lora``."""

    prompt_tokens: int = spec(ge=0)
    completion_tokens: int = spec(ge=0)
    total_tokens: int = spec(ge=0)
    prefill_lora: PrefillLoraUsage | None = None

    def check(self, path: str = "") -> None:
        if self.total_tokens != self.prompt_tokens + self.completion_tokens:
            raise SchemaError("total_tokens must equal prompt_tokens + completion_tokens", path)

@dataclass
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
    request_id: str = spec(pattern=REQUEST_ID_PATTERN)
    index: int = spec(ge=0)
    token_ids: list[int] = spec(default_factory=list, ge=0)
    text: str = ""
    finish_reason: str | None = spec(None, choices=FINISH_REASONS)
    usage: Usage | None = None
    error: ErrorInfo | None = None
    worker_id: str | None = spec(None, pattern=WORKER_ID_PATTERN)
    cancel_token: str | None = spec(None, pattern=CANCEL_TOKEN_PATTERN)

    @property
    def final(self) -> bool:
        return self.finish_reason is not None

    def check(self, path: str = "") -> None:
        if (self.finish_reason == "error") != (self.error is not None):
            raise SchemaError("error must be present exactly when finish_reason is 'error'", path)
