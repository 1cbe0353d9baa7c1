"""The public NATS API: GenerateRequest on ``caraserve.v1.generate``, CancelRequest on ``cancel``.

GenerateRequest mirrors OpenAI's completion and chat-completion bodies. The request's NATS
reply subject is the inbox that receives its Chunk stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.schemas.chunk import CANCEL_TOKEN_PATTERN
from shared.schemas.names import REQUEST_ID_PATTERN
from shared.schemas.sampling import INT64_MAX, INT64_MIN, MAX_COUNT, check_stop
from shared.schemas.wire import Message, SchemaError, Struct, spec

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass
class ChatMessage(Struct):
    """One chat turn (OpenAI ``messages`` item with text content)."""

    role: str = spec(choices=CHAT_ROLES)
    content: str = spec(max_len=4_000_000)


@dataclass
class GenerateRequest(Message):
    """Generate text from ``prompt`` (a string or token ids) or from chat ``messages``.

    ``model`` is the base model's name or an adapter's. ``max_tokens`` None means the OpenAI
    default (16 for a prompt, the rest of the context for chat). ``stream`` false sends one
    final chunk holding the whole output instead of one chunk per step.
    """

    KIND = "generate_request"
    model: str = spec(min_len=1, max_len=256)
    prompt: str | list[int] | None = spec(None, ge=0, le=MAX_COUNT)
    messages: list[ChatMessage] | None = spec(None, max_len=4096)
    max_tokens: int | None = spec(None, ge=1, le=MAX_COUNT)
    temperature: float = spec(1.0, ge=0.0, le=2.0)
    top_p: float = spec(1.0, gt=0.0, le=1.0)
    top_k: int = spec(0, ge=-1, le=MAX_COUNT)
    seed: int | None = spec(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    stream: bool = True
    request_id: str | None = spec(None, pattern=REQUEST_ID_PATTERN)
    api_key: str | None = spec(None, max_len=1024)

    def check(self, path: str = "") -> None:
        if (self.prompt is None) == (self.messages is None):
            raise SchemaError("exactly one of prompt and messages is required", path)
        check_stop(self.stop_list(), f"{path}.stop" if path else "stop")

    def stop_list(self) -> list[str]:
        """``stop`` as a list (OpenAI accepts a string or a list)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


@dataclass
class CancelRequest(Message):
    """Abort request ``request_id`` (to the gateway on ``cancel``, to a worker on ``worker.<id>.cancel``).

    On the public ``cancel`` it takes effect only for the requester: ``cancel_token`` is the
    token of the request's first chunk, or, when API keys are configured, ``api_key`` is a
    key of the request's tenant.
    """

    KIND = "cancel_request"
    request_id: str = spec(pattern=REQUEST_ID_PATTERN)
    api_key: str | None = spec(None, max_len=1024)
    cancel_token: str | None = spec(None, pattern=CANCEL_TOKEN_PATTERN)
