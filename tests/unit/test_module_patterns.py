"""target_modules / rank_pattern regexes: linear time with RE2, or a clear refusal."""

from __future__ import annotations

import re
import time

import pytest

from shared.module_patterns import MAX_PATTERN_CHARS, PatternError, compile_pattern, full_match, suffix_pattern
from tests.tiny_adapters import EVIL_PATTERN

MODULE = "model.layers.10.self_attn.q_proj"


def test_evil_pattern_matches_in_linear_time():
    start = time.monotonic()
    assert not full_match(EVIL_PATTERN, MODULE)
    assert not full_match(EVIL_PATTERN, MODULE * 100)
    assert time.monotonic() - start < 0.5


def test_same_answers_as_python_re_for_peft_patterns():
    for pattern in (r".*\.(q_proj|o_proj)", r"model\.layers\.\d+\.mlp\.down_proj", "q_proj"):
        for module in (MODULE, "model.layers.2.mlp.down_proj", "q_proj"):
            assert full_match(pattern, module) == (re.fullmatch(pattern, module) is not None)
    assert full_match(suffix_pattern("q_proj"), MODULE) and not full_match(suffix_pattern("proj"), MODULE)


@pytest.mark.parametrize("pattern, reason", [
    (r"(.*)\1", "not supported"),
    (r"(?=q)q_proj", "not supported"),
    ("(?:a{1000}){1000}", "not supported"),
    ("a" * (MAX_PATTERN_CHARS + 1), "longer than"),
])
def test_unsupported_patterns_are_refused(pattern, reason, capfd):
    with pytest.raises(PatternError, match=reason) as err:
        compile_pattern(pattern)
    assert "\n" not in str(err.value)
    assert capfd.readouterr().err == ""  # RE2 logs nothing of its own
