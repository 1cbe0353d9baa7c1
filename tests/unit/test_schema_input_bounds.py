"""Schema bounds on client input: no lone surrogate, no int past its range, no unbounded nesting."""

from __future__ import annotations

import msgpack
import pytest

from shared.schemas import GenerateRequest, Sampling, SchemaError
from shared.schemas.sampling import MAX_COUNT

GOOD = {"v": 1, "model": "sql", "prompt": "hi"}


@pytest.mark.parametrize("fields, path", [
    ({"prompt": "a\ud800b"}, "prompt"),
    ({"stop": ["ok", "\udfff"]}, "stop[1]"),
    ({"prompt": None, "messages": [{"role": "user", "content": "\udbff"}]}, "messages[0].content"),
])
def test_a_lone_surrogate_is_refused_with_its_field(fields, path):
    with pytest.raises(SchemaError, match="lone surrogate") as err:
        GenerateRequest.from_envelope({**GOOD, **fields})
    assert err.value.path == path


def test_valid_unicode_is_accepted():
    text = "Grüße 日本語 😀 \U0010ffff"
    assert GenerateRequest.from_envelope({**GOOD, "prompt": text}).prompt == text


@pytest.mark.parametrize("name, value", [("top_k", MAX_COUNT + 1), ("top_k", 2**64), ("max_tokens", 2**70),
                                         ("seed", 2**63), ("prompt", [1, MAX_COUNT + 1])])
def test_client_integers_are_bounded(name, value):
    with pytest.raises(SchemaError, match=name):
        GenerateRequest.from_envelope({**GOOD, name: value})
    assert GenerateRequest.from_envelope({**GOOD, "top_k": MAX_COUNT, "max_tokens": MAX_COUNT}).top_k == MAX_COUNT


@pytest.mark.parametrize("name", ["top_k", "max_tokens"])
def test_sampling_counts_are_bounded(name):
    fields = {"max_tokens": 4, name: MAX_COUNT + 1}
    with pytest.raises(SchemaError, match=name):
        Sampling.from_dict(fields)


def test_msgpack_nested_past_its_stack_is_a_schema_error():
    with pytest.raises(SchemaError, match="nested too deeply"):
        GenerateRequest.decode(b"\x81\xa1x" + b"\x91" * 100_000 + b"\xc0")
    with pytest.raises(SchemaError, match=r"prompt\[0\]: expected int"):  # deep, but refused at the first level
        GenerateRequest.decode(msgpack.packb({**GOOD, "prompt": [[[[[[1]]]]]]}))
