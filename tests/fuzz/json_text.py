"""JSON text that Python's ``json`` module would not write: raw number literals, lone surrogates, deep nesting.

A body is built as Python values, where :class:`Raw` stands for literal JSON text (``1e-300``,
``NaN``, a 5,000-digit integer, 100,000 nested brackets) and strings may hold lone surrogates
(written as ``\\ud800`` escapes). :func:`dumps` writes the whole value as JSON text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Raw:
    """Literal JSON text, written as is."""

    text: str


def dumps(value: Any) -> str:
    """``value`` as JSON text (ASCII only, so lone surrogates become ``\\uXXXX`` escapes)."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    return json.dumps(value)


def nested(depth: int, opener: str = "[") -> Raw:
    """``depth`` nested arrays (or objects keyed "a")."""
    if opener == "[":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)
