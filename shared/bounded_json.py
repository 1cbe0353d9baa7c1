"""JSON parsing with bounds, for text an untrusted party wrote (HTTP bodies, adapter files).

``json.loads`` on hostile input fails in ways callers do not expect: a 100,000-deep
nesting raises RecursionError, a 5,000-digit integer raises a plain ValueError (Python's
int-string limit, 4300 digits), ``\\xed\\xa0\\x80`` (a UTF-8-encoded surrogate) passes
``json``'s own ``surrogatepass`` decoding, and ``NaN`` / ``Infinity`` are accepted.
:func:`loads_bounded` caps the size, decodes strict UTF-8, refuses the non-finite constants,
optionally caps the length of every number literal, bounds the nesting depth, and raises one
error type, :class:`BoundedJsonError`, for all of it.

The depth is checked after parsing: CPython's C parser bounds its own recursion
(RecursionError past about a thousand levels, caught here), and a walk of the parsed
containers by level then enforces ``max_depth``. That costs a fraction of what parsing costs,
where a textual pre-scan (strings stripped by regex, brackets counted) would hold an event loop
for seconds on an 8 MB body. Number hooks cost a Python call per number, so the HTTP edge
leaves ``max_number_chars`` off (the schema bounds the numbers it uses).
"""

from __future__ import annotations

import json
from itertools import chain, compress
from typing import Any

_CONTAINERS = frozenset((list, dict))
_INFINITIES = (float("inf"), float("-inf"))


class BoundedJsonError(ValueError):
    """The text is not JSON, or exceeds a bound; ``str(err)`` is one line."""


def loads_bounded(data: bytes | str, max_bytes: int, max_depth: int = 32,
                  max_number_chars: int | None = 32) -> Any:
    """Parse ``data`` as JSON within the bounds, or raise BoundedJsonError.

    ``max_bytes`` caps the encoded size, ``max_depth`` the nesting of arrays and objects,
    ``max_number_chars`` (None: no cap) the length of each number literal, and with it any
    float that overflows to infinity.
    """
    if len(data) > max_bytes:
        raise BoundedJsonError(f"larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise BoundedJsonError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    hooks = {} if max_number_chars is None else {"parse_int": _number(int, max_number_chars),
                                                 "parse_float": _number(float, max_number_chars)}
    try:
        value = json.loads(text, parse_constant=_no_constant, **hooks)
    except json.JSONDecodeError as exc:
        raise BoundedJsonError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise BoundedJsonError(f"nested deeper than {max_depth} levels") from None
    except BoundedJsonError:  # from a hook
        raise
    except ValueError as exc:  # an integer past the int-string limit
        raise BoundedJsonError(f"a number is too large ({exc})") from None
    check_depth(value, max_depth)
    return value


def check_depth(value: Any, max_depth: int) -> None:
    """Refuse ``value`` if its arrays and objects nest deeper than ``max_depth`` (a walk by level)."""
    level = [value] if type(value) in _CONTAINERS else []
    depth = 0
    while level:
        depth += 1
        if depth > max_depth:
            raise BoundedJsonError(f"nested deeper than {max_depth} levels")
        level = _inner_containers(level)


def _inner_containers(level: list) -> list:
    """The arrays and objects directly inside those of ``level``.

    Iterators do the per-item work at C speed: the walk may run on an event loop, over every
    item of a body (a million token ids take about 30 ms).
    """
    items = list(chain.from_iterable(c.values() if type(c) is dict else c for c in level))
    return list(compress(items, map(_CONTAINERS.__contains__, map(type, items))))


def _number(kind: type, max_chars: int):
    def parse(literal: str) -> int | float:
        if len(literal) > max_chars:
            raise BoundedJsonError(f"number literal longer than {max_chars} characters")
        value = kind(literal)
        if value in _INFINITIES:
            raise BoundedJsonError(f"number {literal} is out of range")
        return value

    return parse


def _no_constant(name: str) -> Any:
    raise BoundedJsonError(f"{name} is not a valid JSON number")
