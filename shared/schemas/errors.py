"""Typed errors on the wire: ErrorInfo (OpenAI-style type, code, message) and ErrorReply."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta

from shared.schemas.wire import Message, SchemaError, Struct, decode_one_of

ERROR_TYPES = ("invalid_request_error", "authentication_error", "not_found_error",
               "rate_limit_error", "server_error", "service_unavailable")

# code -> (OpenAI error type, HTTP status). The one table both the NATS and HTTP edges use.
ERROR_CODES: dict[str, tuple[str, int]] = {
    "bad_payload": ("invalid_request_error", 400),
    "unsupported_version": ("invalid_request_error", 400),
    "invalid_request": ("invalid_request_error", 400),
    "context_length_exceeded": ("invalid_request_error", 400),
    "request_too_large": ("invalid_request_error", 413),
    "unknown_url": ("invalid_request_error", 404),
    "method_not_allowed": ("invalid_request_error", 405),
    "duplicate_request_id": ("invalid_request_error", 400),
    "invalid_api_key": ("authentication_error", 401),
    "permission_denied": ("invalid_request_error", 403),
    "model_not_found": ("not_found_error", 404),
    "request_not_found": ("not_found_error", 404),
    "overloaded": ("rate_limit_error", 429),
    "no_capacity": ("service_unavailable", 503),
    "worker_lost": ("service_unavailable", 503),
    "timeout": ("service_unavailable", 503),
    "shutting_down": ("service_unavailable", 503),
    "profile_not_ready": ("service_unavailable", 503),
    "gateway_restarted": ("service_unavailable", 503),
    "stream_interrupted": ("service_unavailable", 503),
    "worker_error": ("server_error", 500),
    "internal_error": ("server_error", 500),
}


MAX_MESSAGE_CHARS = 8192


class ErrorInfo(Struct):
    """What went wrong: an OpenAI error ``type``, a stable machine ``code`` and a message."""

    type: Literal[ERROR_TYPES]
    code: Annotated[str, Meta(min_length=1, max_length=64)]
    message: Annotated[str, Meta(max_length=MAX_MESSAGE_CHARS)]


class ErrorReply(Message):
    """The reply to a request that failed (bad payload, no capacity, unknown adapter...)."""

    KIND = "error"
    error: ErrorInfo


class RemoteError(Exception):
    """A peer answered a request with an ErrorReply."""

    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(f"{info.code}: {info.message}")
        self.info = info


def error_info(code: str, message: str) -> ErrorInfo:
    """ErrorInfo for a known ``code`` (its type comes from ERROR_CODES).

    A message longer than the schema allows (it may quote client input) is cut, so that the
    error itself always passes validation where it is received.
    """
    if code not in ERROR_CODES:
        raise KeyError(f"unknown error code {code!r}")
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS - 3] + "..."
    return ErrorInfo(type=ERROR_CODES[code][0], code=code, message=message)


def http_status(info: ErrorInfo) -> int:
    """The HTTP status for an error (500 for codes this table does not know)."""
    return ERROR_CODES.get(info.code, ("server_error", 500))[1]


def schema_error_info(exc: SchemaError) -> ErrorInfo:
    """ErrorInfo describing a payload that failed validation."""
    return error_info(exc.code, str(exc))


def decode_reply(data: bytes, cls: type[Any]) -> Any:
    """Decode a reply that is either a ``cls`` message or an ErrorReply.

    Returns the ``cls`` message; raises RemoteError for an ErrorReply and SchemaError when
    the payload is neither. One decode: ``kind`` tells the two apart (a tagged union).
    """
    reply = decode_one_of(data, cls, ErrorReply)
    if isinstance(reply, ErrorReply):
        raise RemoteError(reply.error)
    return reply


class ServiceError(Exception):
    """A service refuses a request; the bus turns it into an ErrorReply (or an error Chunk)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.info = error_info(code, message)

    @classmethod
    def from_info(cls, info: ErrorInfo) -> ServiceError:
        """Re-raise an error a peer reported (its code may be one this table does not know)."""
        error = cls.__new__(cls)
        Exception.__init__(error, f"{info.code}: {info.message}")
        error.info = info
        return error
