"""The worker's metrics under vLLM's names, labels and semantics, for routers and dashboards.

llm-d's LoRA scorers, the Gateway API inference extension and vLLM's Grafana dashboards read
these from a worker's ``/metrics`` as they would from a vLLM server. Every gauge is observed
from the worker's last published :class:`WorkerState` (a snapshot the event loop made, so a
metric reader on another thread never walks live structures); the histograms are recorded
as requests finish and as adapter loads land. Exposed names (after the Views in
:data:`RENAMES`):

* ``vllm:num_requests_running`` / ``vllm:num_requests_waiting`` {model_name, engine}
* ``vllm:kv_cache_usage_perc`` {model_name, engine}: used KV blocks / all blocks (1 = full)
* ``vllm:time_to_first_token_seconds``, ``vllm:request_time_per_output_token_seconds``,
  ``vllm:e2e_request_latency_seconds`` {model_name, engine}: histograms with vLLM's buckets
* ``vllm:lora_requests_info`` {running_lora_adapters, waiting_lora_adapters, max_lora}: one
  series whose value is the scrape's Unix time, as vLLM's ``set_to_current_time``. The lists are
  comma-separated adapter names, sorted: *running* holds the adapters of running requests,
  *waiting* those of queued requests, each computed from its own list (vLLM once wrote every
  adapter into both, which broke llm-d's capacity tier). ``max_lora`` is ``max_batch_size``:
  how many distinct adapters one batch can serve.
* ``vllm:lora_adapter_loaded`` {engine, adapter_name, level, pinned, rank}: 1 per adapter in
  device memory (``level="gpu"``) or host memory (``level="cpu"``); disk-only adapters have no
  series. ``vllm:num_gpu_loaded_lora_adapters`` / ``vllm:num_cpu_loaded_lora_adapters``
  {model_name, engine} count them.
* ``vllm:lora_adapter_load_seconds`` {engine, transition}: ``load`` (disk to host memory) and
  ``activate`` (host memory to device) times of finished adapter loads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from shared.schemas import WorkerState
from shared.schemas.worker_state import RequestLoad
from shared.token_timing import TokenTiming

ENGINE = "0"  # vLLM's data-parallel engine index; a worker is one engine
LEVELS = {"device": "gpu", "host": "cpu"}  # CaraServe tier -> vLLM level; disk is not loaded
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
NAMES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "time_to_first_token_seconds",
         "request_time_per_output_token_seconds", "e2e_request_latency_seconds", "lora_requests_info",
         "lora_adapter_loaded", "num_gpu_loaded_lora_adapters", "num_cpu_loaded_lora_adapters",
         "lora_adapter_load_seconds")
RENAMES = {f"vllm.{name}": f"vllm:{name}" for name in NAMES}  # OTel names cannot hold ':'


def adapter_list(loads: Iterable[RequestLoad]) -> str:
    """The comma-separated, sorted, distinct adapters of ``loads`` (base-model requests left out)."""
    return ",".join(sorted({load.adapter for load in loads if load.adapter}))


def kv_cache_usage(state: WorkerState) -> float:
    """Used KV blocks over all blocks (0 with no cache)."""
    if state.total_kv_blocks == 0:
        return 0.0
    return 1.0 - state.free_kv_blocks / state.total_kv_blocks


class VllmMetrics:
    """Registers the vLLM-named instruments on ``meter``; ``state()`` gives the last published state."""

    def __init__(self, meter: Meter, model_name: str, max_lora: int,
                 state: Callable[[], WorkerState | None]) -> None:
        self.state = state
        self.labels = {"model_name": model_name, "engine": ENGINE}
        self.max_lora = max_lora
        self._gauges(meter)
        self.ttft = _histogram(meter, "time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                               TTFT_BUCKETS)
        self.tpot = _histogram(meter, "request_time_per_output_token_seconds",
                               "Histogram of time_per_output_token_seconds per request.", TPOT_BUCKETS)
        self.e2e = _histogram(meter, "e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                              LATENCY_BUCKETS)
        self.load = _histogram(meter, "lora_adapter_load_seconds",
                               "Time to make a LoRA adapter servable, by transition (load: disk to CPU memory, "
                               "activate: CPU memory to GPU).", LOAD_BUCKETS)

    def _gauges(self, meter: Meter) -> None:
        for name, callback, description in (
                ("num_requests_running", self._running, "Number of requests in model execution batches."),
                ("num_requests_waiting", self._waiting, "Number of requests waiting to be processed."),
                ("kv_cache_usage_perc", self._kv_usage, "KV-cache usage. 1 means 100 percent usage."),
                ("lora_requests_info", self._lora_info, "Running stats on lora requests."),
                ("lora_adapter_loaded", self._loaded, "LoRA adapters loaded, by level (gpu or cpu)."),
                ("num_gpu_loaded_lora_adapters", self._count("gpu"), "Number of LoRA adapters in GPU memory."),
                ("num_cpu_loaded_lora_adapters", self._count("cpu"), "Number of LoRA adapters in CPU memory.")):
            meter.create_observable_gauge(f"vllm.{name}", [callback], description=description)

    # ---- recorded as things happen -------------------------------------------------------
    def record_request(self, ttft: float | None, tpot: float | None, e2e: float) -> None:
        """A request finished: its time to first token, mean time per output token and latency."""
        TokenTiming(e2e, ttft, tpot).record(self, self.labels)

    def record_load(self, adapter: str, transition: str, seconds: float) -> None:
        """An adapter load finished one transition (a residency load listener)."""
        self.load.record(seconds, {"engine": ENGINE, "transition": transition})

    # ---- observed at collection ----------------------------------------------------------
    def _observe(self, value: Callable[[WorkerState], float]) -> Iterable[Observation]:
        state = self.state()
        return [] if state is None else [Observation(value(state), self.labels)]

    def _running(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe(lambda s: len(s.running))

    def _waiting(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe(lambda s: len(s.queued))

    def _kv_usage(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe(kv_cache_usage)

    def _lora_info(self, options: CallbackOptions) -> Iterable[Observation]:
        state = self.state()
        if state is None:
            return []
        return [Observation(time.time(), {"running_lora_adapters": adapter_list(state.running),
                                          "waiting_lora_adapters": adapter_list(state.queued),
                                          "max_lora": str(self.max_lora)})]

    def _loaded(self, options: CallbackOptions) -> Iterable[Observation]:
        state = self.state()
        if state is None:
            return []
        return [Observation(1, {"engine": ENGINE, "adapter_name": a.name, "level": LEVELS[a.level],
                                "pinned": "true" if a.pinned else "false", "rank": str(a.rank)})
                for a in state.adapters if a.level in LEVELS]

    def _count(self, level: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return self._observe(lambda s: sum(1 for a in s.adapters if LEVELS.get(a.level) == level))
        return observe


def _histogram(meter: Meter, name: str, description: str, buckets: tuple[float, ...]):
    return meter.create_histogram(f"vllm.{name}", unit="s", description=description,
                                  explicit_bucket_boundaries_advisory=buckets)
