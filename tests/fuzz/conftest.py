"""The fuzz suite's stack (``caraserve up``'s LocalStack, one worker, one scheduler) and its tally.

The stack is shared by the fuzz tests, unsupervised (a crash must show); a test that left it
broken gets the next one a fresh stack, so each test's verdict is its own. How many examples
each test draws: tests/fuzz/budget.py (``CARASERVE_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from launcher.local_stack import LocalStack
from tests.chaos.stack import ReusedStack, stack_config
from tests.reliability_report import Tally


@pytest.fixture(scope="package")
def fuzz_stacks(tiny_model_dir, tiny_adapters, tmp_path_factory) -> Iterator[ReusedStack]:
    config = stack_config(tiny_model_dir, tiny_adapters, tmp_path_factory.mktemp("fuzz"), workers=1, schedulers=1)
    holder = ReusedStack(config, supervise=False)
    try:
        yield holder
    finally:
        holder.close()


@pytest.fixture
def fuzz_stack(fuzz_stacks) -> LocalStack:
    """A stack that serves when the test starts."""
    return fuzz_stacks.get()


@pytest.fixture(scope="package")
def fuzz_tally() -> Iterator[Tally]:
    tally = Tally()
    yield tally
    tally.save()
