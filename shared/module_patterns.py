"""Module-name regexes from adapter configs, matched in linear time.

PEFT's ``target_modules`` (as a string), and the keys of ``rank_pattern`` / ``alpha_pattern``,
are regular expressions written by whoever made the adapter. Python's backtracking ``re``
can take exponential time on a pattern such as ``(?:.|.){27}Z``, holding the GIL and so
stalling the whole worker. These patterns are compiled with RE2 (``google-re2``), which
matches in time linear in the input, and refused with :class:`PatternError` if RE2 cannot
compile them (backreferences, lookarounds, huge repetitions) or if they are longer than
:data:`MAX_PATTERN_CHARS`.
"""

from __future__ import annotations

import functools

import re2

MAX_PATTERN_CHARS = 1024

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # errors are reported through PatternError, not to stderr


class PatternError(ValueError):
    """A module pattern is too long or not one RE2 can compile; ``str(err)`` is one line."""


@functools.lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> re2._Regexp:
    """``pattern`` compiled by RE2 (cached), or PatternError."""
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(f"pattern longer than {MAX_PATTERN_CHARS} characters")
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        raw = exc.args[0] if exc.args else b""
        reason = " ".join((raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)).split())
        raise PatternError(f"pattern {pattern[:80]!r} is not supported (linear-time RE2 syntax only): "
                           f"{reason}") from None


def suffix_pattern(key: str) -> str:
    """PEFT's rank_pattern / alpha_pattern form: ``key`` matching a whole module-name suffix."""
    return rf"(?:.*\.)?(?:{key})"


def full_match(pattern: str, module: str) -> bool:
    """Whether ``pattern`` matches all of ``module`` (linear time)."""
    return compile_pattern(pattern).fullmatch(module) is not None
