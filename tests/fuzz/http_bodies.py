"""Hypothesis strategies for request bodies of ``/v1/completions`` and ``/v1/chat/completions``.

Each strategy draws ``(input class, body bytes)``. The classes, roughly in proportion:

* ``valid-ish``: a well-formed body whose fields are each, now and then, replaced by a hostile
  value (wrong type, huge or negative integer, 1e-300 / 1e308 / NaN / Infinity as raw JSON text,
  lone surrogate, long string, deep nesting), plus unknown fields, ``stream`` true or false and
  odd ``stream_options``. ``max_tokens`` stays small so generations are cheap;
* ``hostile JSON``: any JSON value at all, or 100,000-deep nesting;
* ``not JSON``: raw bytes, including invalid UTF-8.
"""

from __future__ import annotations

from hypothesis import strategies as st

from tests.fuzz.json_text import Raw, dumps, nested

NUMBER_LITERALS = ("1e-300", "4.9e-324", "1e-38", "1e-45", "-0", "0", "0.0", "1e308", "1e309", "-1e309", "NaN",
                   "Infinity", "-Infinity", "18446744073709551616", "9223372036854775808", "-9223372036854775809",
                   "1" * 5000, "-" + "9" * 5000, "1.5", "2.0000000001", "-1", "1E2")
SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
TEXT = st.text(max_size=40)
SURROGATE_TEXT = st.text(st.one_of(st.characters(), SURROGATES), min_size=1, max_size=40)
LONG_TEXT = st.sampled_from([1_000, 100_000, 1_000_000]).map(lambda n: "a " * (n // 2))
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), TEXT)
ANY_JSON = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(TEXT, inner, max_size=4)),
                        max_leaves=12)
DEEP = st.sampled_from([100, 1_000, 100_000]).flatmap(lambda d: st.sampled_from([nested(d), nested(d, "{")]))

HOSTILE = st.one_of(JSON_SCALARS, st.sampled_from(NUMBER_LITERALS).map(Raw), ANY_JSON, DEEP, LONG_TEXT, SURROGATE_TEXT,
                    st.lists(st.integers(-(2**64), 2**64), min_size=1, max_size=4),
                    st.just(""), st.just("\u0000"), st.just([]), st.just({}))


def sometimes_hostile(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly ``valid``; one draw in ten a hostile value (so about half the bodies stay valid)."""
    return st.integers(0, 9).flatmap(lambda i: HOSTILE if i == 0 else valid)


def numbers(low: float, high: float) -> st.SearchStrategy:
    """Floats in range, and one draw in four an edge literal (1e-300, NaN, 1e309...)."""
    literal = st.sampled_from(NUMBER_LITERALS).map(Raw)
    return st.integers(0, 3).flatmap(lambda i: literal if i == 0 else st.floats(low, high))


def sampling_fields() -> dict[str, st.SearchStrategy]:
    """The optional fields both endpoints take."""
    return {
        "max_tokens": sometimes_hostile(st.integers(1, 6)),
        "temperature": sometimes_hostile(numbers(0.0, 2.0)),
        "top_p": sometimes_hostile(numbers(1e-9, 1.0)),
        "top_k": sometimes_hostile(st.integers(-1, 50)),
        "seed": sometimes_hostile(st.integers(-(2**63), 2**63 - 1)),
        "stop": sometimes_hostile(st.one_of(TEXT.filter(bool), st.lists(TEXT.filter(bool), max_size=4))),
        "ignore_eos": sometimes_hostile(st.booleans()),
        "stream": sometimes_hostile(st.booleans()),
        "stream_options": st.one_of(st.none(), HOSTILE,
                                    st.fixed_dictionaries({"include_usage": sometimes_hostile(st.booleans())})),
        "n": sometimes_hostile(st.just(1)),
        "logprobs": sometimes_hostile(st.none()),
        "logit_bias": sometimes_hostile(st.just({})),
        "user": sometimes_hostile(TEXT),
    }


def unknown_fields() -> st.SearchStrategy[dict]:
    return st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k not in sampling_fields()), HOSTILE,
                           max_size=2)


def prompts() -> st.SearchStrategy:
    return sometimes_hostile(st.one_of(TEXT.filter(bool), st.lists(st.integers(0, 383), min_size=1, max_size=8),
                                       st.lists(TEXT.filter(bool), min_size=1, max_size=1)))


def messages() -> st.SearchStrategy:
    content = sometimes_hostile(st.one_of(TEXT, st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                                 "text": TEXT}), max_size=2)))
    role = sometimes_hostile(st.sampled_from(["system", "user", "assistant", "tool", "developer"]))
    message = st.fixed_dictionaries({"role": role, "content": content})
    return sometimes_hostile(st.lists(message, min_size=1, max_size=2))


def valid_ish(models: list[str], chat: bool) -> st.SearchStrategy[dict]:
    required = {"model": sometimes_hostile(st.sampled_from(models)),
                "messages" if chat else "prompt": messages() if chat else prompts()}
    return st.tuples(st.fixed_dictionaries(required, optional=sampling_fields()), unknown_fields()).map(
        lambda pair: {**pair[0], **pair[1]})


def bodies(models: list[str], chat: bool) -> st.SearchStrategy[tuple[str, bytes]]:
    """``(input class, body)`` for one endpoint."""
    def encoded(value: object) -> bytes:
        return dumps(value).encode("utf-8", "surrogatepass")
    return st.one_of(
        valid_ish(models, chat).map(lambda b: ("valid-ish", encoded(b))),
        valid_ish(models, chat).map(lambda b: ("valid-ish", encoded(b))),
        valid_ish(models, chat).map(lambda b: ("valid-ish", encoded(b))),
        st.one_of(ANY_JSON, DEEP).map(lambda b: ("hostile JSON", encoded(b))),
        st.binary(max_size=64).map(lambda b: ("not JSON", b)),
    )
