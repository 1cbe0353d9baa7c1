"""Bounded JSON decoding of HTTP bodies: hostile input is one invalid_request error, fast."""

from __future__ import annotations

import json
import time

import pytest

from services.gateway.json_body import MAX_DEPTH, parse_json_body
from shared.schemas import ServiceError


def nest(depth: int, inner: str = "1") -> str:
    """``depth`` levels of alternating arrays and objects around ``inner``."""
    text = inner
    for level in range(depth):
        text = f"[{text}]" if level % 2 else f'{{"k": {text}}}'
    return text


def test_ordinary_bodies_parse_unchanged():
    body = {"model": "m", "prompt": [1, 2, 3], "messages": [{"role": "user", "content": "[{\"x"}], "t": 0.5,
            "stream_options": {"include_usage": True}, "n": None}
    assert parse_json_body(json.dumps(body).encode()) == body


@pytest.mark.parametrize("depth", [1, 2, MAX_DEPTH])
def test_nesting_up_to_the_limit_is_accepted(depth):
    assert parse_json_body(nest(depth).encode()) is not None


@pytest.mark.parametrize("text, reason", [
    (nest(MAX_DEPTH + 1), "deeper than 64 levels"),
    ("[" * 100_000 + "]" * 100_000, "deeper than 64 levels"),
    ('{"a": [1, "x", {"b": ' + nest(MAX_DEPTH - 1) + "}]}", "deeper than 64 levels"),
    ('{"n": ' + "9" * 5000 + "}", "a number is too large"),
    ('{"n": NaN}', "NaN is not a valid JSON number"),
    ('{"n": -Infinity}', "-Infinity is not a valid JSON number"),
    ('{"n": 1,', "Expecting property name"),
])
def test_hostile_bodies_are_one_invalid_request(text, reason):
    started = time.monotonic()
    with pytest.raises(ServiceError, match=reason) as err:
        parse_json_body(text.encode())
    assert err.value.info.code == "invalid_request" and time.monotonic() - started < 0.5


def test_invalid_utf8_and_encoded_surrogates_are_refused():
    for raw in (b'{"p": "\xff"}', b'{"p": "\xed\xa0\x80"}'):
        with pytest.raises(ServiceError, match="not UTF-8"):
            parse_json_body(raw)
