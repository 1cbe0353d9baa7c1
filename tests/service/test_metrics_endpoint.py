"""``/metrics`` of a real gpu_worker and gateway, scraped over HTTP and parsed with prometheus_client."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from services.gateway.config import GatewayConfig
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.service import GpuWorkerService
from services.gpu_worker.worker_config import WorkerConfig
from shared import subjects
from shared.schemas import CancelRequest, SubmitAck
from tests.service.helpers import start_gateway
from tests.service.test_gpu_worker_service import Inbox, client, start_worker, submit_for  # noqa: F401


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def scrape(port: int) -> dict:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {family.name: family for family in text_string_to_metric_families(text)}


async def _wait_for(condition, timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("timed out")


async def start_metered_worker(nats_server, stack, model_dir, adapters, port: int) -> GpuWorkerService:
    config = WorkerConfig(worker_id="w1", nats_url=nats_server.url, auto_profile=False, model=str(model_dir),
                          adapters=tuple(f"{n}={p}" for n, p in adapters.items()), state_interval_s=0.05,
                          metrics_port=port)
    service = GpuWorkerService(config, EngineConfig(dtype="float32", device="cpu", max_batch_size=2))
    await service.start(stack)
    return service


def _adapters(loads) -> set[str]:
    return {load.adapter for load in loads if load.adapter}


async def test_worker_metrics_match_its_state_with_two_adapters_running_and_one_waiting(
        nats_server, stack, client, tiny_model_dir, tiny_adapters):  # noqa: F811
    names = sorted(tiny_adapters)[:3]
    service = await start_metered_worker(nats_server, stack, tiny_model_dir, tiny_adapters, free_port())
    await _wait_for(lambda: all(a.level == "device" for a in service.state().adapters))  # cached mode preloads
    inboxes = []
    for i, name in enumerate(names):
        inbox = await Inbox(client, f"_INBOX.test.m{i}").open()
        await client.request(subjects.worker_submit("w1"), submit_for(f"m{i}", inbox.subject, adapter=name,
                                                                      max_tokens=500), SubmitAck, 5)
        inboxes.append(inbox)
    await _wait_for(lambda: service.last_state is not None and len(service.last_state.running) == 2
                    and len(service.last_state.queued) == 1)

    families = await scrape(service.metrics_port)
    state = service.state()
    assert not any(inbox.done.is_set() for inbox in inboxes), "the requests must still be running"
    (info,) = families["vllm:lora_requests_info"].samples
    running, waiting = info.labels["running_lora_adapters"], info.labels["waiting_lora_adapters"]
    assert set(running.split(",")) == _adapters(state.running) and len(_adapters(state.running)) == 2
    assert set(waiting.split(",")) == _adapters(state.queued) and len(_adapters(state.queued)) == 1
    assert set(running.split(",")) | {waiting} == set(names) and waiting not in running.split(",")
    assert info.labels["max_lora"] == "2"
    loaded = {s.labels["adapter_name"]: s.labels for s in families["vllm:lora_adapter_loaded"].samples}
    assert loaded == {a.name: {"adapter_name": a.name, "engine": "0", "level": "gpu", "pinned": "false",
                               "rank": str(a.rank)} for a in state.adapters}
    assert families["vllm:num_requests_running"].samples[0].value == 2
    assert families["vllm:num_requests_waiting"].samples[0].value == 1
    usage = families["vllm:kv_cache_usage_perc"].samples[0].value
    assert 0 < usage <= 1 - state.free_kv_blocks / state.total_kv_blocks  # decoding only takes more blocks
    activations = [s.value for s in families["vllm:lora_adapter_load_seconds"].samples
                   if s.name.endswith("_count") and s.labels["transition"] == "activate"]
    assert activations == [len(state.adapters)]  # each preload landed once on the device

    for i in range(len(names)):
        await client.publish(subjects.worker_cancel("w1"), CancelRequest(request_id=f"m{i}"))
    for inbox in inboxes:
        await asyncio.wait_for(inbox.done.wait(), 30)
    await _wait_for(lambda: service.last_state is not None and not service.last_state.running
                    and not service.last_state.queued)
    families = await scrape(service.metrics_port)
    (info,) = families["vllm:lora_requests_info"].samples
    assert (info.labels["running_lora_adapters"], info.labels["waiting_lora_adapters"]) == ("", "")
    e2e = [s.value for s in families["vllm:e2e_request_latency_seconds"].samples if s.name.endswith("_count")]
    assert e2e == [3]


async def test_gateway_metrics_parse_with_its_serving_instruments(nats_server, stack, tiny_model_dir):
    gateway = await start_gateway(stack, nats_server.url, tiny_model_dir, metrics_port=free_port())
    gateway.telemetry.metrics.requests.add(1, {"adapter": "", "finish_reason": "stop"})
    gateway.telemetry.metrics.ttft.record(0.05, {"adapter": ""})
    families = await scrape(gateway.metrics_port)
    assert families["caraserve_requests"].type == "counter"
    assert [s.value for s in families["caraserve_requests"].samples if s.name == "caraserve_requests_total"] == [1]
    assert families["caraserve_ttft_seconds"].type == "histogram"
    assert families["target_info"].samples[0].labels["service_name"] == "caraserve-gateway"


async def test_metrics_are_off_by_default(nats_server, stack, tiny_model_dir):
    assert WorkerConfig().metrics_port == 0 and GatewayConfig().metrics_port == 0
    gateway = await start_gateway(stack, nats_server.url, tiny_model_dir)
    assert gateway.metrics_port == 0 and gateway.telemetry.prometheus is None
