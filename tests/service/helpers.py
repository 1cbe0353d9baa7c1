"""Helpers shared by the service tests: start services on an AsyncExitStack, wait for conditions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

from services.gateway.config import GatewayConfig
from services.gateway.service import GatewayService
from services.scheduler.config import SchedulerConfig
from services.scheduler.service import SchedulerService
from shared.bus import Bus
from tests.service.fake_worker import FakeWorker


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def start_scheduler(stack: contextlib.AsyncExitStack, url: str, **overrides) -> SchedulerService:
    service = SchedulerService(SchedulerConfig(nats_url=url, grace_s=0.5, **overrides))
    await service.start(stack)
    return service


async def start_gateway(stack: contextlib.AsyncExitStack, url: str, model_dir: Path, **overrides) -> GatewayService:
    settings = dict(nats_url=url, model_dir=str(model_dir), http_port=0, grace_s=0.5)
    settings.update(overrides)
    service = GatewayService(GatewayConfig(**settings))
    await service.start(stack)
    return service


async def start_worker(stack: contextlib.AsyncExitStack, url: str, worker_id: str, **kwargs) -> FakeWorker:
    worker = await FakeWorker(url, worker_id, **kwargs).start()
    stack.push_async_callback(worker.stop)
    return worker


async def client(stack: contextlib.AsyncExitStack, url: str) -> Bus:
    return await Bus.open(url, "test-client", stack, grace_s=0.1)


def make_adapter_dir(root: Path, ranks: dict[str, int]) -> Path:
    """A directory of minimal PEFT adapter configs (the gateway's adapter root; fake workers list the adapters)."""
    for name, rank in ranks.items():
        (root / name).mkdir(parents=True)
        (root / name / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank}))
    return root
