"""Every CaraServe wire message, defined once (msgpack, versioned, validated on receipt by msgspec).

One module per concern: ``wire`` (the envelope, encode and decode on msgspec), ``schema_error``
(SchemaError, from msgspec's refusals), ``names`` (patterns and name types), ``errors``, ``chunk``,
``sampling``, ``generate`` (the public NATS API), ``route`` (gateway -> scheduler),
``worker`` (scheduler -> worker), ``worker_state`` and ``adapters``.
"""

from shared.schemas.adapters import LEVELS, AdapterInfo, AdapterList, AdapterListRequest, AdapterLoad, AdapterUnload
from shared.schemas.chunk import FINISH_REASONS, Chunk, Usage
from shared.schemas.errors import (ERROR_CODES, ErrorInfo, ErrorReply, RemoteError, ServiceError, decode_reply,
                                   error_info, http_status, schema_error_info)
from shared.schemas.generate import ChatMessage, CancelRequest, GenerateRequest
from shared.schemas.route import RequestBody, RouteReply, RouteRequest
from shared.schemas.sampling import Sampling
from shared.schemas.wire import SCHEMA_VERSION, Message, SchemaError, Struct, unpack
from shared.schemas.worker import SubmitAck, WorkerSubmit
from shared.schemas.worker_state import RequestLoad, WorkerState

__all__ = [
    "SCHEMA_VERSION", "LEVELS", "FINISH_REASONS", "ERROR_CODES",
    "Message", "Struct", "SchemaError", "unpack",
    "ErrorInfo", "ErrorReply", "RemoteError", "ServiceError", "decode_reply", "error_info", "http_status",
    "schema_error_info",
    "Chunk", "Usage", "Sampling", "ChatMessage", "GenerateRequest", "CancelRequest",
    "RequestBody", "RouteRequest", "RouteReply", "WorkerSubmit", "SubmitAck",
    "RequestLoad", "WorkerState", "AdapterInfo", "AdapterLoad", "AdapterUnload", "AdapterListRequest",
    "AdapterList",
]
