"""Adapter ownership end to end (issue 13): with API keys, only an adapter's owner tenant or an
admin may re-register or unload it, and no alias may open another tenant's folder. A real
gpu_worker, scheduler, gateway and nats-server."""

from __future__ import annotations

import shutil

import aiohttp
import pytest

from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.residency.config import ResidencyConfig
from services.gpu_worker.service import GpuWorkerService
from services.gpu_worker.worker_config import WorkerConfig
from tests.service.helpers import start_gateway, start_scheduler, wait_until

pytestmark = pytest.mark.timeout(90)

KEYS = {"alice": "key-a", "bob": "key-b", "admin": "key-root"}


@pytest.fixture
async def base(nats_server, stack, tiny_model_dir, tiny_adapters, tmp_path):
    root = tmp_path / "root"
    for name, folder in (("qv_r8", "qv_r8"), ("all7_r16", "alice/sql"), ("qv_r8", "bob/sql")):
        shutil.copytree(tiny_adapters[name], root / folder)
    worker = GpuWorkerService(WorkerConfig(worker_id="w1", nats_url=nats_server.url, model=str(tiny_model_dir),
                                           auto_profile=False, state_interval_s=0.05),
                              EngineConfig(dtype="float32", device="cpu"), ResidencyConfig(adapter_dir=str(root)))
    await worker.start(stack)
    await start_scheduler(stack, nats_server.url)
    gateway = await start_gateway(stack, nats_server.url, tiny_model_dir, adapter_dir=str(root),
                                  model_name=worker.model_name,
                                  api_keys=tuple(f"{key}:{tenant}" for tenant, key in KEYS.items()),
                                  tenant_adapters=("alice:qv_r8",))
    await wait_until(lambda: "w1" in gateway.fleet.live_workers())
    return f"http://127.0.0.1:{gateway.http_port}"


async def call(http, url, tenant, body):
    async with http.post(url, json=body, headers={"Authorization": f"Bearer {KEYS[tenant]}"}) as response:
        text = await response.text()
        return response.status, text


async def test_only_the_owner_or_an_admin_changes_an_adapter(base):
    load, unload = f"{base}/v1/load_lora_adapter", f"{base}/v1/unload_lora_adapter"
    complete = f"{base}/v1/completions"
    use = {"model": "alice-sql", "prompt": "hello", "max_tokens": 2, "temperature": 0}
    async with aiohttp.ClientSession() as http:
        assert (await call(http, load, "alice", {"lora_name": "alice-sql", "lora_path": "alice/sql"}))[0] == 200
        assert (await call(http, load, "alice", {"lora_name": "alice-sql", "lora_path": "alice/sql"}))[0] == 200
        # bob: re-register her name (then use it), alias her folder, unload hers: all refused
        status, text = await call(http, load, "bob", {"lora_name": "alice-sql", "lora_path": "alice/sql"})
        assert status == 403 and "permission_denied" in text, text
        assert (await call(http, complete, "bob", use))[0] == 404
        for path in ("alice/sql", "alice/../alice/sql", "bob/../alice/sql"):
            status, text = await call(http, load, "bob", {"lora_name": "bob-alias", "lora_path": path})
            assert status == 403 and "permission_denied" in text, (path, text)
        assert (await call(http, unload, "bob", {"lora_name": "alice-sql"}))[0] == 404
        assert (await call(http, complete, "alice", use))[0] == 200  # hers still works
        # the operator's adapter: alice may use (and alias) it, but only an admin may change it
        assert (await call(http, load, "alice", {"lora_name": "alice-qv", "lora_path": "qv_r8"}))[0] == 200
        assert (await call(http, load, "bob", {"lora_name": "bob-qv", "lora_path": "qv_r8"}))[0] == 403
        assert (await call(http, unload, "alice", {"lora_name": "qv_r8"}))[0] == 403
        assert (await call(http, load, "bob", {"lora_name": "qv_r8", "lora_path": "qv_r8"}))[0] == 403
        # bob's own adapter is his to load and unload
        assert (await call(http, load, "bob", {"lora_name": "bob-sql", "lora_path": "bob/sql"}))[0] == 200
        assert (await call(http, unload, "alice", {"lora_name": "bob-sql"}))[0] == 404
        assert (await call(http, unload, "bob", {"lora_name": "bob-sql"}))[0] == 200
        # an admin may do anything
        assert (await call(http, unload, "admin", {"lora_name": "alice-sql"}))[0] == 200
        assert (await call(http, complete, "alice", use))[0] == 404
        assert (await call(http, load, "bob", {"lora_name": "alice-sql", "lora_path": "bob/sql"}))[0] == 200
