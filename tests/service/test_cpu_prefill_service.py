"""The cpu_prefill service against a real gpu_worker (cpu_assist) over a real nats-server."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import uuid

import pytest

from services.cpu_prefill.config import PoolConfig
from services.cpu_prefill.service import EXIT_REFUSED, CpuPrefillService
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.residency.config import ResidencyConfig
from services.gpu_worker.service import GpuWorkerService
from services.gpu_worker.worker_config import WorkerConfig
from shared import subjects
from shared.bus import Bus
from shared.schemas import SubmitAck, WorkerState
from tests.service.test_gpu_worker_service import Inbox, _no_exit, submit_for
from tests.service.helpers import wait_until

pytestmark = pytest.mark.timeout(420)


async def start_assisted_worker(nats_server, stack, model_dir, adapters, worker_id) -> GpuWorkerService:
    config = WorkerConfig(worker_id=worker_id, nats_url=nats_server.url, auto_profile=False, model=str(model_dir),
                          adapters=tuple(f"{n}={p}" for n, p in adapters.items()), state_interval_s=0.05)
    residency = ResidencyConfig(cold_start="cpu_assist", cpu_prefill_workers=2, assist_tokens_per_core=2,
                                emulate_link_gbps=2e-5, emulate_link_latency_ms=300.0)
    service = GpuWorkerService(config, EngineConfig(dtype="float32", device="cpu", num_threads=1), residency,
                               exit_process=_no_exit)
    await service.start(stack)
    return service


def shm_names(worker_id: str) -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"caraserve-{worker_id}-")}


@pytest.fixture
def worker_id() -> str:
    return f"w{uuid.uuid4().hex[:8]}"


async def test_the_pool_says_hello_and_cold_requests_are_assisted(nats_server, tiny_model_dir, tiny_adapters,
                                                                 worker_id):
    async with contextlib_stack() as stack:
        worker = await start_assisted_worker(nats_server, stack, tiny_model_dir, tiny_adapters, worker_id)
        pool = CpuPrefillService(PoolConfig(worker_id=worker_id, nats_url=nats_server.url, model=str(tiny_model_dir)))
        await pool.start(stack)
        await wait_until(lambda: worker.engine.pool.healthy(), timeout_s=30)
        client = await Bus.open(nats_server.url, "test-client", stack)
        states: list[WorkerState] = []
        await client.listen(subjects.state(worker_id), WorkerState, lambda s, m: states.append(s))
        inbox = await Inbox(client, "_INBOX.test.cold").open()
        submit = submit_for("cold", inbox.subject, adapter="all7_r16")
        submit.worker_id = worker_id
        await client.request(subjects.worker_submit(worker_id), submit, SubmitAck, 5)
        await asyncio.wait_for(inbox.done.wait(), 60)
        assert len(inbox.token_ids) == 6 and inbox.chunks[-1].finish_reason == "length"
        report = worker.engine.residency.report().assist
        assert report.assisted == 1 and report.cpu_layers > 0 and report.pool_alive == 2
        await wait_until(lambda: any(s.assist is not None and s.assist.assisted == 1 for s in states), timeout_s=5)
        assert states[-1].assist.pool_healthy and states[-1].assist.pool_workers == 2
    assert not shm_names(worker_id)  # the worker unlinked its ring and adapter segments


async def test_a_pool_for_another_model_is_refused_at_hello(nats_server, tiny_model_dir, tiny_adapters, worker_id,
                                                           tmp_path, caplog):
    other = tmp_path / "other-model"
    other.mkdir()
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (other / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, other / name)
    async with contextlib_stack() as stack:
        await start_assisted_worker(nats_server, stack, tiny_model_dir, tiny_adapters, worker_id)
        pool = CpuPrefillService(PoolConfig(worker_id=worker_id, nats_url=nats_server.url, model=str(other)))
        with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exited:
            await pool.start(stack)
        assert exited.value.code == EXIT_REFUSED
        lines = [r.getMessage() for r in caplog.records if "refused by worker" in r.getMessage()]
        assert len(lines) == 1 and "model geometry" in lines[0], lines


def contextlib_stack():
    import contextlib

    return contextlib.AsyncExitStack()
