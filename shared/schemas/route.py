"""What the gateway asks the scheduler on ``caraserve.v1.route``: RouteRequest -> RouteReply.

A RouteRequest carries an already tokenized and validated request. The scheduler picks a
worker, forwards the request as a WorkerSubmit and replies with the worker's id; if it cannot
place the request within ``deadline_ms`` it publishes a terminal ``no_capacity`` Chunk to
``reply_inbox`` and replies with an ErrorReply.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from shared.schemas.chunk import TokenId
from shared.schemas.names import Inbox, Instance, ModelName, Name, RequestId, WorkerId
from shared.schemas.sampling import Sampling
from shared.schemas.schema_error import field_path
from shared.schemas.wire import Message, NonNegativeInt, SchemaError, default


class RequestBody(Message, kw_only=True):
    """The fields a request keeps from the gateway to the worker: the body of RouteRequest and
    WorkerSubmit (never sent on its own).

    The worker's context is ``prompt_token_ids + generated_token_ids``: after a worker loss,
    ``generated_token_ids`` holds the tokens already streamed to the client, and the new
    worker generates at most ``sampling.max_tokens - len(generated_token_ids)`` more. Usage
    still counts ``prompt_token_ids`` as the prompt and every generated token as completion.
    """

    request_id: RequestId
    model: ModelName
    adapter: Name | None = None
    prompt_token_ids: Annotated[list[TokenId], Meta(min_length=1)]
    generated_token_ids: list[TokenId] = default([])
    sampling: Sampling
    reply_inbox: Inbox
    tenant: Name = default("default")
    attempt: Annotated[int, Meta(ge=0, le=64)] = default(0)

    def check(self, path: str = "") -> None:
        self.sampling.check(field_path(path, "sampling"))
        if len(self.generated_token_ids) >= self.sampling.max_tokens:
            raise SchemaError("generated_token_ids must be shorter than sampling.max_tokens", path)

    def remaining_tokens(self) -> int:
        """How many tokens are still to be generated."""
        return self.sampling.max_tokens - len(self.generated_token_ids)

    def context_tokens(self) -> int:
        """Tokens the worker prefills: the prompt plus the tokens generated before a re-route."""
        return len(self.prompt_token_ids) + len(self.generated_token_ids)


class RouteRequest(RequestBody, kw_only=True):
    """Place a request on a worker within ``deadline_ms``, avoiding ``exclude_workers``."""

    KIND = "route_request"
    deadline_ms: Annotated[int, Meta(ge=1, le=600_000)] = default(2000)
    exclude_workers: Annotated[list[WorkerId], Meta(max_length=1024)] = default([])


class RouteReply(Message):
    """The worker a request was forwarded to, with what its SubmitAck said: every state of that
    worker ``instance`` with a ``seq`` past ``state_seq`` lists the request while the worker holds it."""

    KIND = "route_reply"
    request_id: RequestId
    worker_id: WorkerId
    state_seq: NonNegativeInt = default(0)
    instance: Instance = default("")
