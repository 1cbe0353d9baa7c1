"""The chaos suite's stack: ``caraserve up``'s LocalStack, two workers, one scheduler, shared by the
fault tests and supervised as ``caraserve up`` supervises it (a process that dies is restarted).
A test that leaves it broken gets the next test a fresh one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chaos.stack import ReusedStack, stack_config
from tests.reliability_report import Tally


@pytest.fixture(scope="module")
def chaos_stack(tiny_model_dir, tiny_adapters, tmp_path_factory) -> Iterator[ReusedStack]:
    config = stack_config(tiny_model_dir, tiny_adapters, tmp_path_factory.mktemp("chaos"), workers=2,
                          schedulers=1, env={"CARASERVE_MAX_MODEL_LEN": "512"})
    holder = ReusedStack(config, supervise=True)
    try:
        yield holder
    finally:
        holder.close()


@pytest.fixture(scope="module")
def chaos_tally() -> Iterator[Tally]:
    tally = Tally()
    yield tally
    tally.save()


@pytest.fixture(scope="module")
def references() -> dict:
    """Undisturbed outputs per request, filled by the first test that needs them."""
    return {}
