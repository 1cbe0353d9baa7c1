"""Runtime adapter registration end to end: gateway HTTP (vLLM routes) and NATS ``adapters.*``
against a real gpu_worker with tiered residency, a real scheduler and a real nats-server."""

from __future__ import annotations

import logging
import shutil
import time

import aiohttp
import pytest

from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.residency.config import ResidencyConfig
from services.gpu_worker.service import GpuWorkerService
from services.gpu_worker.worker_config import WorkerConfig
from shared import subjects
from shared.schemas import AdapterList, AdapterListRequest, AdapterLoad, AdapterUnload, RemoteError
from tests.service.helpers import client, start_gateway, start_scheduler, wait_until
from tests.tiny_adapters import build_hostile_adapters

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
                                           auto_profile=False, state_interval_s=0.05),
                              EngineConfig(dtype="float32", device="cpu"),
                              ResidencyConfig(adapter_dir=str(adapter_root), emulate_link_latency_ms=5.0))
    await worker.start(stack)
    await start_scheduler(stack, nats_server.url)
    gateway = await start_gateway(stack, nats_server.url, tiny_model_dir, adapter_dir=str(adapter_root),
                                  model_name=worker.model_name)
    await wait_until(lambda: "w1" in gateway.fleet.live_workers())
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
    root_adapters = set(worker.engine.residency.names())  # the root's adapters are known from the start
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
    assert set(worker.engine.residency.names()) == root_adapters | {"a"}


async def test_nats_adapters_subjects(nats_server, stack, cluster):
    _, _, worker = cluster
    root_adapters = set(worker.engine.residency.names())
    bus = await client(stack, nats_server.url)
    listing = await bus.request(subjects.ADAPTERS_LOAD, AdapterLoad(name="pinned-one", path="all7_r16", pinned=True),
                                AdapterList, timeout=5)
    assert listing.worker_id == "w1" and {a.name: a.pinned for a in listing.adapters}["pinned-one"]
    await wait_until(lambda: worker.engine.residency.level("pinned-one") == "device")
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


HOSTILE_REFUSALS = {"rank_bool": "r must be an integer", "huge_int": "number literal", "deep_config": "nested deeper",
                    "nan_weights": "NaN or Inf", "sparse_claim": "do not match the base model",
                    "backref_targets": "not supported", "long_pattern": "pattern longer"}


async def _error(http, url, body=None, data=None):
    async with http.post(url, json=body, data=data) as response:
        return response.status, await response.json()


async def test_http_hostile_adapters_are_refused_at_registration(cluster, adapter_root, tiny_adapters, tmp_path):
    _, base, worker = cluster
    build_hostile_adapters(tiny_adapters["qv_r8"], adapter_root / "uploads")
    before = set(worker.engine.residency.names())
    url = f"{base}/v1/load_lora_adapter"
    async with aiohttp.ClientSession() as http:
        for kind, reason in HOSTILE_REFUSALS.items():
            status, body = await _error(http, url, {"lora_name": kind, "lora_path": f"uploads/{kind}"})
            assert status == 400 and body["error"]["code"] == "invalid_request", (kind, body)
            assert reason in body["error"]["message"], (kind, body)
        start = time.monotonic()
        status, _ = await _post(http, url, {"lora_name": "evil", "lora_path": "uploads/redos_targets"})
        assert status == 200 and time.monotonic() - start < 5  # RE2: linear time, the worker never stalls
        status, _ = await _post(http, url, {"lora_name": "sql", "lora_path": "qv_r8"})  # the rest still works
        assert status == 200
    assert set(worker.engine.residency.names()) == before | {"evil", "sql"}


async def test_http_bad_lora_path_and_name_get_openai_style_400(cluster):
    _, base, worker = cluster
    before = set(worker.engine.residency.names())
    url = f"{base}/v1/load_lora_adapter"
    bad_bodies = [{"lora_name": "x", "lora_path": "qv\x00_r8"}, {"lora_name": "x", "lora_path": "a" * 5000},
                  {"lora_name": "x", "lora_path": "qv_r8/" + "b" * 300},
                  {"lora_name": "x" * 5000, "lora_path": "qv_r8"},
                  {"lora_name": "x\x00", "lora_path": "qv_r8"}, {"lora_name": 7, "lora_path": "qv_r8"},
                  {"lora_name": "x", "lora_path": ["qv_r8"]}, {"lora_name": "x", "lora_path": "qv_r8", "pinned": "no"}]
    async with aiohttp.ClientSession() as http:
        for body in bad_bodies:
            status, answer = await _error(http, url, body)
            assert status == 400, (str(body)[:80], answer)
            assert set(answer["error"]) >= {"message", "type", "code"} and len(answer["error"]["message"]) < 600
        for raw in ("[" * 100_000 + "]" * 100_000, '{"lora_name": ' + "9" * 5000 + "}"):
            status, answer = await _error(http, url, data=raw.encode())
            assert status == 400 and answer["error"]["type"] == "invalid_request_error", answer
        status, answer = await _error(http, f"{base}/v1/unload_lora_adapter", {"lora_name": "y" * 5000})
        assert status == 400
    assert set(worker.engine.residency.names()) == before


async def test_bad_folders_in_the_root_are_skipped_at_start(nats_server, stack, tiny_model_dir, tiny_adapters,
                                                            tmp_path, caplog):
    root = tmp_path / "hostile_root"
    build_hostile_adapters(tiny_adapters["qv_r8"], root)
    shutil.copytree(tiny_adapters["qv_r8"], root / "good")
    with caplog.at_level(logging.WARNING):
        worker = GpuWorkerService(WorkerConfig(worker_id="w2", nats_url=nats_server.url, model=str(tiny_model_dir),
                                               auto_profile=False, state_interval_s=0.05),
                                  EngineConfig(dtype="float32", device="cpu"), ResidencyConfig(adapter_dir=str(root)))
        await worker.start(stack)
        await start_scheduler(stack, nats_server.url)
        gateway = await start_gateway(stack, nats_server.url, tiny_model_dir, adapter_dir=str(root),
                                      model_name=worker.model_name)
    await wait_until(lambda: "w2" in gateway.fleet.live_workers())
    assert "good" in worker.engine.residency.names() and "rank_bool" not in worker.engine.residency.names()
    for kind in ("rank_bool", "huge_int", "deep_config", "backref_targets", "long_pattern"):
        lines = [r.getMessage() for r in caplog.records if f"{root / kind} skipped" in r.getMessage()]
        assert len(lines) == 1, (kind, lines)  # from the worker (the gateway reads no folder: states list adapters)
    async with aiohttp.ClientSession() as http:
        body = {"model": "good", "prompt": "hello", "max_tokens": 2, "temperature": 0}
        async with http.post(f"http://127.0.0.1:{gateway.http_port}/v1/completions", json=body) as response:
            assert response.status == 200, await response.text()
