"""What the scheduler sends a worker on ``worker.<id>.submit``: WorkerSubmit -> SubmitAck.

The worker streams the request's Chunks straight to ``reply_inbox`` and answers the submit
with a SubmitAck once the request is queued (or with an ErrorReply when it refuses it).
"""

from __future__ import annotations

from shared.schemas.names import Instance, RequestId, WorkerId
from shared.schemas.route import RequestBody, RouteRequest
from shared.schemas.wire import Message, NonNegativeInt, default


class WorkerSubmit(RequestBody, kw_only=True):
    """A routed request, addressed to worker ``worker_id``."""

    KIND = "worker_submit"
    worker_id: WorkerId

    @classmethod
    def from_route(cls, route: RouteRequest, worker_id: str) -> WorkerSubmit:
        """The submit that forwards ``route`` to ``worker_id``."""
        return cls(request_id=route.request_id, model=route.model, adapter=route.adapter,
                   prompt_token_ids=route.prompt_token_ids,
                   generated_token_ids=route.generated_token_ids, sampling=route.sampling,
                   reply_inbox=route.reply_inbox, tenant=route.tenant, attempt=route.attempt,
                   worker_id=worker_id)


class SubmitAck(Message):
    """A worker accepted a request.

    ``state_seq`` is the sequence number of the worker's last published WorkerState: every
    state with a larger ``seq`` already accounts for this request. ``instance`` is the
    worker process's WorkerState.instance ("" from a worker that does not report one).
    """

    KIND = "submit_ack"
    request_id: RequestId
    worker_id: WorkerId
    state_seq: NonNegativeInt
    instance: Instance = default("")
