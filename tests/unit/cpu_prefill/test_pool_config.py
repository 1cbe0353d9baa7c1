"""PoolConfig validation, and a model whose geometry cannot be read: one line and exit status 2, before NATS."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from services.cpu_prefill.config import PoolConfig
from services.cpu_prefill.service import EXIT_REFUSED, CpuPrefillService
from shared.config import ConfigError, from_env


def test_the_environment_configures_the_pool():
    config = from_env(PoolConfig, {"CARASERVE_WORKER_ID": "worker-3", "CARASERVE_CPU_PREFILL_WORKERS": "4",
                                   "CARASERVE_HEARTBEAT_S": "0.25"})
    assert (config.worker_id, config.cpu_prefill_workers, config.heartbeat_s) == ("worker-3", 4, 0.25)


@pytest.mark.parametrize("bad", [{"worker_id": "a b"}, {"heartbeat_s": 0.0}, {"cpu_prefill_workers": -1},
                                 {"hello_timeout_s": 0.0}, {"nats_url": ""}])
def test_bad_values_are_refused(bad):
    with pytest.raises(ConfigError):
        PoolConfig(**bad)


def test_an_unreadable_model_is_one_line_and_exit_status_2(tmp_path, caplog):
    (tmp_path / "config.json").write_text("{not json")
    service = CpuPrefillService(PoolConfig(model=str(tmp_path), nats_url="nats://127.0.0.1:1"))

    async def start() -> None:
        async with contextlib.AsyncExitStack() as stack:
            await service.start(stack)

    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exited:
        asyncio.run(start())
    assert exited.value.code == EXIT_REFUSED and service.bus is None  # NATS was never tried
    assert len([r for r in caplog.records if "cannot read the geometry" in r.getMessage()]) == 1
