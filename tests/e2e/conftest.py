"""The whole stack for end-to-end tests, started once per session through the launcher's LocalStack.

``e2e_stack`` is what ``caraserve up`` runs (nats-server, two scheduler replicas, two
gpu_workers, the gateway, each its own process) on the tiny fp32 model and the tiny PEFT
adapters, with every service exporting traces and metrics to one ``rotel-agent`` collector
(``e2e_collector``). A test that damages the stack (kills a process) calls
:meth:`StackHolder.damage`; the next test that asks for the stack gets a fresh one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from launcher.local_stack import LocalStack, StackConfig
from shared.bus import Bus
from tests.e2e.clients import OTEL_VARS
from tests.service.rotel import RotelCollector

WORKERS = 2
SCHEDULERS = 2


def copy_adapters(adapters: dict[str, Path], root: Path) -> Path:
    """``root`` with one copy per adapter (the adapter-dir layout the services read; the workers'
    registry refuses symlinks that leave the root)."""
    for name, path in adapters.items():
        shutil.copytree(path, root / name)
    return root


def stack_config(model_dir: Path, adapter_root: Path, run_dir: Path, collector: RotelCollector) -> StackConfig:
    env = {"CARASERVE_DTYPE": "float32", "CARASERVE_NUM_KV_BLOCKS": "256",
           "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50",
           "OTEL_METRIC_EXPORT_INTERVAL": "1000"}
    return StackConfig(model=str(model_dir), adapter_dir=str(adapter_root), http_port=0, nats_port=0,
                       workers=WORKERS, schedulers=SCHEDULERS, ready_timeout_s=120, run_dir=str(run_dir),
                       extra_env=env)


class StackHolder:
    """Starts the stack on first use, and again after a test damaged it."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.stack: LocalStack | None = None
        self.damaged = False

    def get(self) -> LocalStack:
        if self.stack is None or self.damaged:
            self.close()
            self.stack = LocalStack(self.config)
            self.stack.start()
            self.damaged = False
        return self.stack

    def damage(self) -> None:
        self.damaged = True

    def close(self) -> None:
        if self.stack is not None:
            self.stack.stop()
            self.stack = None


@pytest.fixture(scope="session")
def adapter_root(tiny_adapters, tmp_path_factory) -> Path:
    return copy_adapters(tiny_adapters, tmp_path_factory.mktemp("e2e_adapters") / "adapters")


@pytest.fixture(scope="session")
def e2e_collector(tmp_path_factory) -> Iterator[RotelCollector]:
    with RotelCollector(tmp_path_factory.mktemp("e2e_rotel")) as collector:
        yield collector


@pytest.fixture(scope="session")
def stack_holder(tiny_model_dir, adapter_root, e2e_collector, tmp_path_factory) -> Iterator[StackHolder]:
    saved = {name: os.environ.pop(name) for name in OTEL_VARS if name in os.environ}
    holder = StackHolder(stack_config(tiny_model_dir, adapter_root, tmp_path_factory.mktemp("e2e_run"),
                                      e2e_collector))
    try:
        yield holder
    finally:
        holder.close()
        os.environ.update(saved)


@pytest.fixture
def e2e_stack(stack_holder) -> LocalStack:
    return stack_holder.get()


@pytest.fixture
async def nats_client(e2e_stack) -> AsyncIterator[Bus]:
    async with contextlib.AsyncExitStack() as stack:
        # the operator identity: these tests also watch internal subjects (state.*, route, submits)
        yield await Bus.open(e2e_stack.nats_url, "e2e-client", stack, grace_s=0.1,
                             credentials=e2e_stack.creds.credentials("operator"))
