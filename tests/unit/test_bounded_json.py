"""Bounded JSON parsing: every hostile input is one BoundedJsonError, fast."""

from __future__ import annotations

import time

import pytest

from shared.bounded_json import BoundedJsonError, check_depth, loads_bounded


def test_ordinary_json_parses():
    assert loads_bounded(b'{"r": 8, "a": [1.5, "x[{"], "b": null}', 1000) == {"r": 8, "a": [1.5, "x[{"], "b": None}


@pytest.mark.parametrize("text, reason", [
    ("[" * 100_000 + "]" * 100_000, "nested deeper"),
    ('{"r": ' + "9" * 5000 + "}", "number literal longer"),
    ('{"r": 1e400}', "out of range"),
    ('{"r": NaN}', "NaN is not"),
    ('{"r": -Infinity}', "Infinity is not"),
    ('{"r": 8,', "invalid JSON"),
    ("x" * 2000, "larger than"),
])
def test_hostile_json_is_one_error(text, reason):
    start = time.monotonic()
    with pytest.raises(BoundedJsonError, match=reason):
        loads_bounded(text.encode(), 1500 if reason == "larger than" else 1 << 20)
    assert time.monotonic() - start < 1.0


def test_depth_counts_the_deepest_branch_only():
    wide = [[[1]] * 1000, {"a": [[[[2]]]]}]  # depths 3 and 5 below the top list
    check_depth(wide, 6)
    with pytest.raises(BoundedJsonError, match="deeper than 5"):
        check_depth(wide, 5)
    check_depth("not a container", 0)


def test_brackets_inside_strings_do_not_count():
    assert loads_bounded('{"a": "' + "[" * 100 + '"}', 1000, max_depth=2) == {"a": "[" * 100}


def test_not_utf8():
    with pytest.raises(BoundedJsonError, match="UTF-8"):
        loads_bounded(b'{"a": "\xff"}', 100)
