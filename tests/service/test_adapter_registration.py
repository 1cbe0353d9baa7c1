"""Runtime adapter registration end to end: gateway HTTP (vLLM routes) and NATS ``adapters.*``
against a real gpu_worker with tiered residency, a real scheduler and a real nats-server."""

from __future__ import annotations

import shutil

import aiohttp
import pytest

from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.residency_config import ResidencyConfig
from services.gpu_worker.service import GpuWorkerService
from services.gpu_worker.worker_config import WorkerConfig
from shared import subjects
from shared.schemas import AdapterList, AdapterListRequest, AdapterLoad, AdapterUnload, RemoteError
from tests.service.helpers import client, start_gateway, start_scheduler, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def adapter_root(tmp_path, tiny_adapters):
    root = tmp_path / "root"
    root.mkdir()
    for name in ("qv_r8", "all7_r16"):
        shutil.copytree(tiny_adapters[name], root / name)
    shutil.copytree(tiny_adapters["regex_r64"], tmp_path / "outside")
    return root


@pytest.fixture
async def cluster(nats_server, stack, tiny_model_dir, adapter_root):
    """A residency-enabled worker w1, the scheduler and a gateway; returns (gateway, base URL, worker)."""
    worker = GpuWorkerService(WorkerConfig(worker_id="w1", nats_url=nats_server.url, model=str(tiny_model_dir),
                                           state_interval_s=0.05),
                              EngineConfig(dtype="float32", device="cpu"),
                              ResidencyConfig(adapter_dir=str(adapter_root), emulate_link_latency_ms=5.0))
    await worker.start(stack)
    await start_scheduler(stack, nats_server.url)
    gateway = await start_gateway(stack, nats_server.url, tiny_model_dir, adapter_dir=str(adapter_root),
                                  model_name=worker.model_name)
    await wait_until(lambda: "w1" in gateway.watch.live_workers())
    return gateway, f"http://127.0.0.1:{gateway.http_port}", worker


async def _post(http, url, body):
    async with http.post(url, json=body) as response:
        return response.status, (await response.text())


async def _models(http, base):
    async with http.get(f"{base}/v1/models") as response:
        return {m["id"]: m for m in (await response.json())["data"]}


async def test_http_load_use_unload(cluster):
    gateway, base, worker = cluster
    async with aiohttp.ClientSession() as http:
        status, text = await _post(http, f"{base}/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "qv_r8"})
        assert status == 200 and "sql" in text
        await wait_until(lambda: "sql" in {a.name for a in worker.state().adapters})
        models = await _models(http, base)
        assert models["sql"]["rank"] == 8 and models["sql"]["workers"][0]["worker"] == "w1"
        body = {"model": "sql", "prompt": "hello", "max_tokens": 3, "temperature": 0}
        async with http.post(f"{base}/v1/completions", json=body) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["usage"]["completion_tokens"] == 3
        await wait_until(lambda: {a.name: a.level for a in worker.state().adapters}["sql"] == "device")
        assert (await _models(http, base))["sql"]["workers"] == [{"worker": "w1", "level": "device"}]

        status, _ = await _post(http, f"{base}/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert status == 200 and "sql" not in await _models(http, base)
        async with http.post(f"{base}/v1/completions", json=body) as response:
            assert response.status == 404
        status, text = await _post(http, f"{base}/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert status == 404, text


async def test_http_bad_registrations_get_400_and_change_nothing(cluster):
    _, base, worker = cluster
    root_adapters = set(worker.engine.adapters.names())  # the root's adapters are known from the start
    url = f"{base}/v1/load_lora_adapter"
    async with aiohttp.ClientSession() as http:
        for path in ("../outside", "/etc", "qv_r8/../../outside"):
            status, text = await _post(http, url, {"lora_name": "x", "lora_path": path})
            assert status == 400 and "outside the adapter root" in text, (path, text)
        assert (await _post(http, url, {"lora_name": "a", "lora_path": "qv_r8"}))[0] == 200
        status, text = await _post(http, url, {"lora_name": "a", "lora_path": "all7_r16"})
        assert status == 400 and "already registered" in text
        assert (await _post(http, url, {"lora_name": "a", "lora_path": "qv_r8"}))[0] == 200  # same path: fine
        assert (await _post(http, url, {"lora_path": "qv_r8"}))[0] == 400
        assert (await _post(http, url, {"lora_name": "b"}))[0] == 400
        assert (await _post(http, url, {"lora_name": "../b", "lora_path": "qv_r8"}))[0] == 400
    assert set(worker.engine.adapters.names()) == root_adapters | {"a"}


async def test_nats_adapters_subjects(nats_server, stack, cluster):
    _, _, worker = cluster
    root_adapters = set(worker.engine.adapters.names())
    bus = await client(stack, nats_server.url)
    listing = await bus.request(subjects.ADAPTERS_LOAD, AdapterLoad(name="pinned-one", path="all7_r16", pinned=True),
                                AdapterList, timeout=5)
    assert listing.worker_id == "w1" and {a.name: a.pinned for a in listing.adapters}["pinned-one"]
    await wait_until(lambda: worker.engine.adapters.level("pinned-one") == "device")
    with pytest.raises(RemoteError) as err:
        await bus.request(subjects.ADAPTERS_LOAD, AdapterLoad(name="esc", path="../outside"), AdapterList, timeout=5)
    assert err.value.info.code == "invalid_request"
    listed = await bus.request(subjects.ADAPTERS_LIST, AdapterListRequest(), AdapterList, timeout=5)
    assert {a.name for a in listed.adapters} == root_adapters | {"pinned-one"}
    unloaded = await bus.request(subjects.ADAPTERS_UNLOAD, AdapterUnload(name="pinned-one"), AdapterList, timeout=5)
    assert {a.name for a in unloaded.adapters} == root_adapters
    with pytest.raises(RemoteError) as err:
        await bus.request(subjects.ADAPTERS_UNLOAD, AdapterUnload(name="pinned-one"), AdapterList, timeout=5)
    assert err.value.info.code == "model_not_found"
