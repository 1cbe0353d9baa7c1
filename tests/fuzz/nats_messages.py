"""Hypothesis strategies for NATS payloads: valid messages with hostile fields, hostile maps, raw bytes.

Each subject gets a template (a valid message of its schema, as its msgpack map). A draw is
``(input class, payload bytes)``:

* ``edge values``: the template's schema kept, but its numbers drawn from edge values that the
  schema may well accept (temperature or top_p 1e-300 or 5e-324, out-of-vocabulary token ids,
  int64 extremes), its booleans flipped;
* ``mutated``: the template with some fields replaced by hostile msgpack values (huge or
  negative integers, 1e-300, 1e308, NaN, Infinity, wrong types, long strings, nested lists,
  invalid UTF-8 in a string), some fields dropped and unknown ones added;
* ``hostile map``: any msgpack map, with or without a valid envelope;
* ``raw bytes``: arbitrary bytes, truncated msgpack, 100,000-deep nesting.
"""

from __future__ import annotations

import math

import msgpack
from hypothesis import strategies as st

INVALID_UTF8 = b"\xed\xa0\x80\xff"  # a surrogate's UTF-8 form and a stray byte
_MARK = "\x00mk\x00"  # same length as INVALID_UTF8 once encoded: replaced by it after packing

FLOATS = st.sampled_from([1e-300, 5e-324, 1e-38, 1e-45, -0.0, 1e308, -1e308, math.inf, -math.inf, math.nan, 0.5])
INTS = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, -1, 2**63 - 1, 2**64 - 1, -(2**63)]))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, st.floats(), st.text(max_size=20), st.binary(max_size=20),
                    st.just(_MARK), st.just("x" * 100_000))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.one_of(st.text(max_size=8), INTS), inner,
                                                                       max_size=4)), max_leaves=10)
NESTED = st.integers(1, 400).map(lambda depth: _nest(depth))


def _nest(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def pack(value: object) -> bytes:
    """msgpack bytes of ``value``, with every ``_MARK`` string turned into invalid UTF-8."""
    data = msgpack.packb(value, use_bin_type=True, strict_types=False)
    return data.replace(_MARK.encode(), INVALID_UTF8)


EDGE_FLOATS = st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e-45, 1e-38, 1e-8, 0.5, 1.0, 2.0])
EDGE_INTS = st.sampled_from([0, 1, 2, -1, 383, 384, 2**31, 2**63 - 1, -(2**63)])
ENVELOPE = ("v", "kind")


@st.composite
def edge_values(draw: st.DrawFn, template: dict) -> bytes:
    """``template`` with each number, now and then, replaced by an edge value of its type."""
    def edge(value: object) -> object:
        if isinstance(value, bool):
            return draw(st.booleans())
        if isinstance(value, float):
            return draw(EDGE_FLOATS) if draw(st.booleans()) else value
        if isinstance(value, int):
            return draw(EDGE_INTS) if draw(st.integers(0, 3)) == 0 else value
        if isinstance(value, dict):
            return {k: edge(v) for k, v in value.items()}
        if isinstance(value, list):
            return [edge(v) for v in value]
        return value
    return pack({k: v if k in ENVELOPE else edge(v) for k, v in template.items()})


def mutated(template: dict) -> st.SearchStrategy[bytes]:
    """``template`` with hostile values in some fields, some fields dropped, some unknown added."""
    keys = sorted(template)
    hostile = st.one_of(VALUES, NESTED)
    changes = st.dictionaries(st.sampled_from(keys), hostile, min_size=1, max_size=3)
    dropped = st.lists(st.sampled_from(keys), max_size=2)
    unknown = st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in template), VALUES,
                              max_size=2)
    return st.tuples(changes, dropped, unknown).map(
        lambda parts: pack({**{k: v for k, v in template.items() if k not in parts[1]}, **parts[0], **parts[2]}))


def hostile_maps(template: dict) -> st.SearchStrategy[bytes]:
    envelope = st.fixed_dictionaries({}, optional={"v": st.one_of(st.just(template["v"]), VALUES),
                                                   "kind": st.one_of(st.just(template["kind"]), VALUES)})
    body = st.dictionaries(st.one_of(st.text(max_size=10), INTS, st.binary(max_size=4)), VALUES, max_size=6)
    return st.tuples(envelope, body).map(lambda parts: pack({**parts[1], **parts[0]}))


RAW = st.one_of(st.binary(max_size=64), st.just(b""), st.just(b"\x91" * 100_000 + b"\xc0"),
                st.just(b"\xdf\xff\xff\xff\xff"), st.just(b"\xc1"), st.just(b"\xd4\x00\x00"))


def payloads(template: dict) -> st.SearchStrategy[tuple[str, bytes]]:
    """``(input class, payload)`` for a subject whose valid message is ``template``."""
    return st.one_of(
        edge_values(template).map(lambda b: ("edge values", b)),
        edge_values(template).map(lambda b: ("edge values", b)),
        mutated(template).map(lambda b: ("mutated", b)),
        hostile_maps(template).map(lambda b: ("hostile map", b)),
        st.one_of(RAW, VALUES.map(pack)).map(lambda b: ("raw bytes", b)),
    )
