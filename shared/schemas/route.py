"""What the gateway asks the scheduler on ``caraserve.v1.route``: RouteRequest -> RouteReply.

A RouteRequest carries an already tokenized and validated request. The scheduler picks a
worker, forwards the request as a WorkerSubmit and replies with the worker's id; if it cannot
place the request within ``deadline_ms`` it publishes a terminal ``no_capacity`` Chunk to
``reply_inbox`` and replies with an ErrorReply.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.schemas.names import INSTANCE_PATTERN, NAME_PATTERN, REQUEST_ID_PATTERN, SUBJECT_PATTERN, WORKER_ID_PATTERN
from shared.schemas.sampling import Sampling
from shared.schemas.wire import Message, SchemaError, Struct, spec


@dataclass(kw_only=True)
class RequestBody(Struct):
    """The fields a request keeps from the gateway to the worker.

    The worker's context is ``prompt_token_ids + generated_token_ids``: after a worker loss,
    ``generated_token_ids`` holds the tokens already streamed to the client, and the new
    worker generates at most ``sampling.max_tokens - len(generated_token_ids)`` more. Usage
    still counts ``prompt_token_ids`` as the prompt and every generated token as completion.
    """

    request_id: str = spec(pattern=REQUEST_ID_PATTERN)
    model: str = spec(min_len=1, max_len=256)
    adapter: str | None = spec(None, pattern=NAME_PATTERN)
    prompt_token_ids: list[int] = spec(min_len=1, ge=0)
    generated_token_ids: list[int] = spec(default_factory=list, ge=0)
    sampling: Sampling
    reply_inbox: str = spec(max_len=1024, pattern=SUBJECT_PATTERN)
    tenant: str = spec("default", pattern=NAME_PATTERN)
    attempt: int = spec(0, ge=0, le=64)

    def check(self, path: str = "") -> None:
        if len(self.generated_token_ids) >= self.sampling.max_tokens:
            raise SchemaError("generated_token_ids must be shorter than sampling.max_tokens", path)

    def remaining_tokens(self) -> int:
        """How many tokens are still to be generated."""
        return self.sampling.max_tokens - len(self.generated_token_ids)

    def context_tokens(self) -> int:
        """Tokens the worker prefills: the prompt plus the tokens generated before a re-route."""
        return len(self.prompt_token_ids) + len(self.generated_token_ids)


@dataclass(kw_only=True)
class RouteRequest(Message, RequestBody):
    """Place a request on a worker within ``deadline_ms``, avoiding ``exclude_workers``."""

    KIND = "route_request"
    deadline_ms: int = spec(2000, ge=1, le=600_000)
    exclude_workers: list[str] = spec(default_factory=list, max_len=1024, pattern=WORKER_ID_PATTERN)


@dataclass
class RouteReply(Message):
    """The worker a request was forwarded to, with what its SubmitAck said: every state of that
    worker ``instance`` with a ``seq`` past ``state_seq`` lists the request while the worker holds it."""

    KIND = "route_reply"
    request_id: str = spec(pattern=REQUEST_ID_PATTERN)
    worker_id: str = spec(pattern=WORKER_ID_PATTERN)
    state_seq: int = spec(0, ge=0)
    instance: str = spec("", pattern=INSTANCE_PATTERN)
