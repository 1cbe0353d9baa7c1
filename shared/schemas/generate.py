"""The public NATS API: GenerateRequest on ``caraserve.v1.generate``, CancelRequest on ``cancel``.

GenerateRequest mirrors OpenAI's completion and chat-completion bodies. The request's NATS
reply subject is the inbox that receives its Chunk stream.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from shared.schemas.chunk import CancelToken
from shared.schemas.names import ModelName, RequestId
from shared.schemas.sampling import BoundedTokenId, MaxTokens, Seed, Temperature, TopK, TopP, check_stop
from shared.schemas.wire import Message, SchemaError, Struct, default

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

ApiKey = Annotated[str, Meta(max_length=1024)]


class ChatMessage(Struct):
    """One chat turn (OpenAI ``messages`` item with text content)."""

    role: Literal[CHAT_ROLES]
    content: Annotated[str, Meta(max_length=4_000_000)]


class GenerateRequest(Message):
    """Generate text from ``prompt`` (a string or token ids) or from chat ``messages``.

    ``model`` is the base model's name or an adapter's. ``max_tokens`` None means the OpenAI
    default (16 for a prompt, the rest of the context for chat). ``stream`` false sends one
    final chunk holding the whole output instead of one chunk per step.
    """

    KIND = "generate_request"
    model: ModelName
    prompt: str | list[BoundedTokenId] | None = None
    messages: Annotated[list[ChatMessage], Meta(max_length=4096)] | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature = default(1.0)
    top_p: TopP = default(1.0)
    top_k: TopK = default(0)
    seed: Seed | None = None
    stop: str | list[str] | None = None
    ignore_eos: bool = default(False)
    stream: bool = default(True)
    request_id: RequestId | None = None
    api_key: ApiKey | None = None

    def check(self, path: str = "") -> None:
        if (self.prompt is None) == (self.messages is None):
            raise SchemaError("exactly one of prompt and messages is required", path)
        check_stop(self.stop_list(), f"{path}.stop" if path else "stop")

    def stop_list(self) -> list[str]:
        """``stop`` as a list (OpenAI accepts a string or a list)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CancelRequest(Message):
    """Abort request ``request_id`` (to the gateway on ``cancel``, to a worker on ``worker.<id>.cancel``).

    On the public ``cancel`` it takes effect only for the requester: ``cancel_token`` is the
    token of the request's first chunk, or, when API keys are configured, ``api_key`` is a
    key of the request's tenant.
    """

    KIND = "cancel_request"
    request_id: RequestId
    api_key: ApiKey | None = None
    cancel_token: CancelToken | None = None
