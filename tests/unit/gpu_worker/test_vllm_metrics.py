"""The worker's vLLM-named metrics through the real OTel Prometheus exporter, parsed back."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from services.gpu_worker.vllm_metrics import RENAMES, VllmMetrics
from shared.prometheus_endpoint import PrometheusExport
from shared.schemas import AdapterInfo, WorkerState
from shared.schemas.worker_state import RequestLoad
from shared.telemetry import setup_telemetry


def _state() -> WorkerState:
    running = [RequestLoad(key="k1", adapter="b"), RequestLoad(key="k2", adapter="a"),
               RequestLoad(key="k3", adapter="a"), RequestLoad(key="k4")]
    queued = [RequestLoad(key="k5", adapter="c"), RequestLoad(key="k6", adapter="a")]
    adapters = [AdapterInfo("a", 8, "device"), AdapterInfo("b", 16, "device", True), AdapterInfo("c", 4, "host"),
                AdapterInfo("d", 32, "disk")]
    return WorkerState(worker_id="w", model="m", backend="bgmv", running=running, queued=queued, adapters=adapters,
                       free_kv_blocks=30, total_kv_blocks=40)


def _scrape(state: WorkerState | None) -> dict:
    export = PrometheusExport(RENAMES)
    telemetry = setup_telemetry("worker", {}, export)
    try:
        metrics = VllmMetrics(telemetry.meter, "m", 4, lambda: state)
        metrics.record_request(0.05, 0.02, 1.2)
        metrics.record_request(None, None, 0.4)
        metrics.record_load("a", "load", 0.003)
        metrics.record_load("a", "activate", 0.001)
        text = export.text().decode()
    finally:
        telemetry.shutdown()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_names_labels_and_values_are_vllms():
    families = _scrape(_state())
    (info,) = families["vllm:lora_requests_info"].samples
    assert info.labels == {"running_lora_adapters": "a,b", "waiting_lora_adapters": "a,c", "max_lora": "4"}
    assert info.value > 1.7e9  # a Unix time, as vLLM's set_to_current_time
    loaded = {s.labels["adapter_name"]: s.labels for s in families["vllm:lora_adapter_loaded"].samples}
    assert loaded == {"a": {"adapter_name": "a", "engine": "0", "level": "gpu", "pinned": "false", "rank": "8"},
                      "b": {"adapter_name": "b", "engine": "0", "level": "gpu", "pinned": "true", "rank": "16"},
                      "c": {"adapter_name": "c", "engine": "0", "level": "cpu", "pinned": "false", "rank": "4"}}
    gauges = {name: families[name].samples[0] for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                                                          "vllm:kv_cache_usage_perc",
                                                          "vllm:num_gpu_loaded_lora_adapters",
                                                          "vllm:num_cpu_loaded_lora_adapters")}
    assert {n: s.value for n, s in gauges.items()} == {
        "vllm:num_requests_running": 4, "vllm:num_requests_waiting": 2, "vllm:kv_cache_usage_perc": 0.25,
        "vllm:num_gpu_loaded_lora_adapters": 2, "vllm:num_cpu_loaded_lora_adapters": 1}
    assert all(s.labels == {"model_name": "m", "engine": "0"} for s in gauges.values())
    for name, count in (("vllm:time_to_first_token_seconds", 1), ("vllm:request_time_per_output_token_seconds", 1),
                        ("vllm:e2e_request_latency_seconds", 2)):
        assert families[name].type == "histogram"
        counts = [s.value for s in families[name].samples if s.name == f"{name}_count"]
        assert counts == [count], name
    loads = {s.labels["transition"]: s.value for s in families["vllm:lora_adapter_load_seconds"].samples
             if s.name.endswith("_count")}
    assert loads == {"load": 1, "activate": 1}


def test_no_state_yet_means_no_gauge_series_and_two_exports_in_one_process_do_not_collide():
    first, second = _scrape(None), _scrape(_state())
    assert "vllm:lora_requests_info" not in first and "vllm:num_requests_running" not in first
    assert second["vllm:num_requests_running"].samples[0].value == 4
