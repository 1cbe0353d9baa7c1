"""Decode an HTTP request body as JSON, within bounds, or refuse it with a 400.

A client controls every byte of the body. :func:`shared.bounded_json.loads_bounded` turns
each hostile shape (100,000-deep nesting, a 5,000-digit integer, an encoded surrogate,
``NaN``) into one error, which becomes ``ServiceError("invalid_request")`` here. Numbers are
not capped by length (a Python call per number would hold the event loop on a large body):
an integer may not pass Python's int-string limit, and a float literal that overflows
becomes inf, which every float field of the schema refuses.
"""

from __future__ import annotations

from typing import Any

from shared.bounded_json import BoundedJsonError, loads_bounded
from shared.schemas import ServiceError

MAX_DEPTH = 64


def parse_json_body(data: bytes) -> Any:
    """The JSON value ``data`` holds; ServiceError ``invalid_request`` if it is not bounded JSON
    (the body's size is bounded by the HTTP server before it gets here)."""
    try:
        return loads_bounded(data, len(data), MAX_DEPTH, max_number_chars=None)
    except BoundedJsonError as exc:
        raise ServiceError("invalid_request", f"the body is not valid JSON: {exc}") from None
