"""How many examples each fuzz test draws: ``CARASERVE_FUZZ_EXAMPLES``, by default sized for about
a minute for the whole fuzz suite on two cores. Raise it for a longer run, e.g.
``CARASERVE_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest -q tests/fuzz``. The draws are
derandomized: the same examples, in the same order, every run."""

from __future__ import annotations

import os

EXAMPLES_ENV = "CARASERVE_FUZZ_EXAMPLES"
DEFAULT_EXAMPLES = 200


def fuzz_examples() -> int:
    """How many examples each fuzz test draws."""
    return int(os.environ.get(EXAMPLES_ENV, "") or DEFAULT_EXAMPLES)
