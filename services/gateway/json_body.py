"""Decode an HTTP request body as JSON, within bounds, or refuse it with a 400.

A client controls every byte of the body. msgspec's JSON decoder parses it: strict UTF-8, no
``NaN`` or ``Infinity``, no lone surrogate escape, integers up to 4300 digits, floats within range,
and a bounded recursion. The nesting is then bounded to MAX_DEPTH levels by a walk of the parsed
containers (:func:`shared.bounded_json.check_depth`). Whatever is refused becomes one
``ServiceError("invalid_request")``.

msgspec refuses in few words ("Input data was truncated"), so a refused body is parsed again by
:func:`shared.bounded_json.loads_bounded`, whose words clients already get ("Expecting property
name", "a number is too large", "NaN is not a valid JSON number", "not UTF-8"). Two things that
JSON allows and msgspec does not, a lone surrogate escape (``"\\ud800"``) and a float literal past
the float range (which becomes inf), pass that parser: the schema then refuses the field that holds
them, by name ("prompt: holds a lone surrogate", "temperature: must be finite").
"""

from __future__ import annotations

from typing import Any

import msgspec

from shared.bounded_json import BoundedJsonError, check_depth, loads_bounded
from shared.schemas import ServiceError

MAX_DEPTH = 64

_REFUSED = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)  # ValidationError is a DecodeError


def parse_json_body(data: bytes) -> Any:
    """The JSON value ``data`` holds; ServiceError ``invalid_request`` if it is not bounded JSON
    (the body's size is bounded by the HTTP server before it gets here)."""
    try:
        return _decoded(data)
    except BoundedJsonError as exc:
        raise ServiceError("invalid_request", f"the body is not valid JSON: {exc}") from None


def _decoded(data: bytes) -> Any:
    try:
        value = msgspec.json.decode(data)
    except _REFUSED:
        return loads_bounded(data, len(data), MAX_DEPTH, max_number_chars=None)  # says why, or lets the schema
    check_depth(value, MAX_DEPTH)
    return value
