"""The gpu_worker service: the engine behind ``worker.<id>.submit`` and ``worker.<id>.cancel``.

* A WorkerSubmit is validated, queued in the engine and acknowledged with a SubmitAck
  whose ``state_seq`` says which published states already account for it.
* The engine steps on its own thread (:class:`StepThread`); each step's outputs become
  Chunks published, in order, straight to the request's reply inbox.
* ``state.<id>`` is published at least every ``state_interval_s`` and after every step
  that admitted or finished a request: running and queued requests (adapter, rank,
  prompt and remaining tokens), adapters with their tier, free KV blocks, the model name.
* Each request gets spans ``worker.queue``, ``worker.prefill`` and ``worker.decode`` under
  the trace context of its submit, and TTFT/TPOT/e2e/per-adapter metrics. With ``metrics_port``
  the worker serves them on ``/metrics``, with vLLM's metrics (``vllm_metrics.py``) beside them.
* A submit past ``max_batch_size + max_queued`` held requests is refused (``overloaded``); one
  whose request id this worker already holds is refused (``duplicate_request_id``) and the
  request holding it is left alone.
* States show requests by :func:`request_key` only, never by id, and carry ``instance``, a
  random id of this process, so a restarted worker with the same id is told apart.
* Its performance profile (``profiling/worker_profile.py``) is found in the profile cache or
  made by a quick grid while it serves (state ``profile: pending``); then the state carries
  the profile's digest, ``worker.<id>.profile`` answers with the profile, and backend
  ``auto`` switches the engine to the family the profile predicts faster.
* If the engine's step thread dies (an error the engine could not pin on requests), the
  watchdog fails every held request with a final ``worker_error`` chunk, stops publishing
  states and ends the process with EXIT_ENGINE_DIED, so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.msg import Msg
from opentelemetry import context as otel_context

from services.gpu_worker.adapter_admin import AdapterAdmin
from services.gpu_worker.engine import EngineStats, LLMEngine
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.profiling.worker_profile import ProfileSettings, Published, WorkerProfile
from services.gpu_worker.request import (DuplicateRequestError, EngineRequest, PrefillLora, RequestError,
                                        RequestOutput, SamplingParams, UnknownAdapterRequestError)
from services.gpu_worker.residency.config import ResidencyConfig
from services.gpu_worker.residency.pool_health import PoolHealth
from services.gpu_worker.residency.telemetry import register_residency_metrics
from services.gpu_worker.step_thread import StepThread
from services.gpu_worker.vllm_metrics import RENAMES, VllmMetrics
from services.gpu_worker.worker_config import WorkerConfig
from shared import subjects
from shared.background import run_in_background
from shared.backends import AUTO
from shared.bus import Bus, yield_to_io
from shared.config import ConfigError, from_env
from shared.nats_auth import load_credentials
from shared.served_name import served_model_name
from shared.schemas import (AdapterInfo, CancelRequest, Chunk, RequestLoad, ServiceError, SubmitAck, Usage,
                            WorkerState, WorkerSubmit, error_info)
from shared.schemas.chunk import PrefillLoraUsage
from shared.schemas.cpu_prefill import PoolHeartbeat, PoolHello, PoolWelcome
from shared.schemas.profile import ProfileReply, ProfileRequest
from shared.schemas.worker_state import AssistState
from shared.schemas.names import request_key
from shared.perf_model import ProfileError
from shared.prometheus_endpoint import PrometheusExport, serve_metrics
from shared.telemetry import Telemetry, extract_context, setup_telemetry, start_span
from shared.thread_limits import run_in_passing_thread, serial_executor
from shared.token_timing import TokenTiming

logger = logging.getLogger(__name__)

SERVICE_NAME = "caraserve-gpu-worker"
EXIT_ENGINE_DIED = 70  # EX_SOFTWARE: the engine thread died; restart the process
FLUSH_TIMEOUT_S = 2.0
REFUSAL_CODES = {UnknownAdapterRequestError: "model_not_found", DuplicateRequestError: "duplicate_request_id"}


@dataclass
class Tracked:
    """A request this worker accepted, from submit to its final chunk."""

    submit: WorkerSubmit
    parent: otel_context.Context
    submitted: float = field(default_factory=time.time)
    first_token: float | None = None
    scheduled: float | None = None
    chunks: int = 0
    tokens: int = 0  # generated and sent so far
    prefill_lora: PrefillLora | None = None  # how its prefill got its LoRA deltas


def sampling_params(submit: WorkerSubmit) -> SamplingParams:
    s = submit.sampling
    return SamplingParams(max_tokens=submit.remaining_tokens(), temperature=s.temperature, top_p=s.top_p,
                          top_k=s.top_k, seed=s.seed, stop=tuple(s.stop), stop_token_ids=tuple(s.stop_token_ids),
                          ignore_eos=s.ignore_eos)


class GpuWorkerService:
    """One worker: :meth:`start` wires it onto an AsyncExitStack."""

    def __init__(self, worker: WorkerConfig, engine: EngineConfig | None = None,
                 residency: ResidencyConfig | None = None, exit_process: Callable[[int], None] = os._exit) -> None:
        """``exit_process(status)`` ends the process after the engine died (tests pass a recorder)."""
        self.config, self.engine_config = worker, engine or EngineConfig()
        self.residency = residency
        self.exit_process = exit_process
        self.instance = secrets.token_hex(8)  # this process's id in every state it publishes
        self.engine: LLMEngine | None = None
        self.profile: WorkerProfile | None = None
        self.model_dir: Path | None = None  # resolved when the engine is built
        self.bus: Bus | None = None
        self.telemetry: Telemetry | None = None
        self.vllm_metrics: VllmMetrics | None = None
        self.last_state: WorkerState | None = None  # the last published state (what /metrics reads)
        self.metrics_port = 0  # the bound /metrics port (0: off)
        self.model_name = ""
        self.seq = 0
        self._tracked: dict[str, Tracked] = {}
        self._stats: EngineStats | None = None
        self._dirty = asyncio.Event()
        self._chunks: asyncio.Queue = asyncio.Queue()
        self._finished: list[tuple[Tracked, RequestOutput]] = []  # telemetry still to record
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: StepThread | None = None
        self._engine_died = asyncio.Event()
        self.engine_dead = False  # set once the watchdog saw the step thread die: no more states

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> GpuWorkerService:
        return cls(from_env(WorkerConfig, environ), from_env(EngineConfig, environ), from_env(ResidencyConfig, environ))

    @staticmethod
    def config_classes() -> tuple[type, ...]:
        return (WorkerConfig, EngineConfig, ResidencyConfig)

    @property
    def healthy(self) -> bool:
        return (self.bus is not None and self.bus.connected and self._thread is not None and self._thread.alive
                and not self.engine_dead)

    # ---- start and stop ----------------------------------------------------------------
    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        export = PrometheusExport(RENAMES) if self.config.metrics_port else None
        self.telemetry = setup_telemetry(SERVICE_NAME, prometheus=export)
        stack.callback(self.telemetry.shutdown)
        self._loop = asyncio.get_running_loop()
        self._loop.set_default_executor(serial_executor("gpu-worker-io"))  # no second OpenMP team
        self.engine = await run_in_passing_thread(self._build_engine, "engine-build")
        try:
            self.profile = WorkerProfile(self._profile_settings(), self._served_ranks)
        except ProfileError as exc:
            self.engine.close()
            raise ConfigError(f"profile refused: {exc}") from None
        register_residency_metrics(self.telemetry.meter, self.engine.residency.report, self.config.worker_id)
        self.vllm_metrics = VllmMetrics(self.telemetry.meter, self.model_name, self.engine_config.max_batch_size,
                                        lambda: self.last_state)
        self.engine.residency.add_load_listener(self.vllm_metrics.record_load)
        self.bus = await Bus.open(self.config.nats_url, f"gpu-worker-{self.config.worker_id}", stack,
                                  self.config.grace_s, load_credentials(self.config.nats_creds))
        for task in (self._publish_chunks(), self._publish_states(), self._watch_engine(),
                     self.profile.run(self._on_profile)):
            run_in_background(stack, task)
        self._thread = StepThread(self.engine, self._on_step_threadsafe, self._on_death_threadsafe)
        self._thread.start()
        stack.push_async_callback(self._stop_engine)
        await self.publish_state()
        if export is not None:
            self.metrics_port = await serve_metrics(export, self.config.metrics_host, self.config.metrics_port, stack)
        wid = self.config.worker_id
        await self.bus.serve(subjects.worker_submit(wid), WorkerSubmit, self._on_submit, concurrent=False)
        await self.bus.serve(subjects.worker_cancel(wid), CancelRequest, self._on_cancel, concurrent=False)
        await AdapterAdmin(wid, self.engine.residency).serve(self.bus)
        await self.bus.serve(subjects.worker_profile(wid), ProfileRequest, self._on_profile_request)
        if self.engine.pool is not None:
            await self._serve_pool(self.engine.pool)
        logger.info("gpu_worker %s serving %s (%s, backend %s)", wid, self.model_name,
                    self.engine_config.resolved_device(), self.engine_config.backend)

    def _profile_settings(self) -> ProfileSettings:
        residency = self.residency or ResidencyConfig()
        return ProfileSettings(self.model_dir, self.engine_config.dtype, self.engine_config.resolved_device(),
                               self.engine_config.backend, self.config.profile, self.config.auto_profile,
                               residency.emulate_link_gbps, residency.emulate_link_latency_ms)

    def _served_ranks(self) -> list[int]:
        return sorted({info.rank for info in self._adapter_infos()})

    def _on_profile(self, published: Published) -> None:
        """The profile is ready (or superseded): serve with its family, say so in the next state."""
        assert self.engine is not None
        if self.engine_config.backend == AUTO:
            self.engine.set_backend(published.backend)
        self._dirty.set()

    async def _on_profile_request(self, request: ProfileRequest, msg: Msg) -> ProfileReply:
        assert self.profile is not None
        published = self.profile.published
        if published is None:
            raise ServiceError("profile_not_ready", f"worker {self.config.worker_id}'s profile is "
                                                    f"{self.profile.status or 'not kept'}")
        return ProfileReply(worker_id=self.config.worker_id, digest=published.digest, profile=published.text)

    async def _serve_pool(self, pool: PoolHealth) -> None:
        """Answer the CPU prefill pool's hello and heartbeats (cpu_assist mode)."""
        assert self.bus is not None
        wid = self.config.worker_id

        async def hello(message: PoolHello, msg: Msg) -> PoolWelcome:
            return pool.welcome(message)

        async def heartbeat(message: PoolHeartbeat, msg: Msg) -> PoolWelcome:
            return pool.heartbeat(message)

        await self.bus.serve(subjects.cpu_prefill_hello(wid), PoolHello, hello)
        await self.bus.serve(subjects.cpu_prefill_heartbeat(wid), PoolHeartbeat, heartbeat)
        logger.info("gpu_worker %s: cpu_assist, waiting for its cpu_prefill pool on %s", wid, pool.ring_name)

    def _build_engine(self) -> LLMEngine:
        from shared.model_store import resolve_model_dir

        model_dir = self.model_dir = resolve_model_dir(None if self.config.model == "default" else self.config.model)
        self.model_name = served_model_name(model_dir, self.config.model_name)
        return LLMEngine(model_dir, self.engine_config, self.config.adapter_paths(),
                         residency=self.residency or ResidencyConfig(cold_start="cached"),
                         worker_id=self.config.worker_id)

    async def _stop_engine(self) -> None:
        """Let running requests finish within the grace period, then stop the step thread."""
        assert self.engine is not None and self._thread is not None
        deadline = time.monotonic() + self.config.grace_s
        while self._tracked and time.monotonic() < deadline and self._thread.alive:
            await asyncio.sleep(0.05)
        for request_id in list(self._tracked):
            self.engine.abort(request_id)
        await asyncio.to_thread(self._thread.stop)
        self.engine.close()

    # ---- requests in -------------------------------------------------------------------
    async def _on_submit(self, submit: WorkerSubmit, msg: Msg) -> SubmitAck:
        assert self.engine is not None
        if submit.worker_id != self.config.worker_id:
            raise ServiceError("invalid_request", f"submit for worker {submit.worker_id} reached {self.config.worker_id}")
        if self._thread is None or not self._thread.alive or self.engine_dead:
            raise ServiceError("worker_error", "the engine is not running")
        if submit.request_id in self._tracked:  # refused without touching the request that holds the id
            raise ServiceError("duplicate_request_id", f"request {submit.request_id!r} is already running here")
        capacity = self.engine_config.max_batch_size + self.config.max_queued
        if len(self._tracked) >= capacity:
            raise ServiceError("overloaded", f"worker {self.config.worker_id} holds {capacity} requests, its most")
        request = EngineRequest(submit.request_id, submit.prompt_token_ids + submit.generated_token_ids,
                                submit.adapter, sampling_params(submit),
                                resumed_tokens=len(submit.generated_token_ids))
        try:
            self.engine.add_request(request)
        except RequestError as exc:
            raise ServiceError(REFUSAL_CODES.get(type(exc), "invalid_request"), str(exc)) from None
        # no await since add_request: the step's outputs for it cannot be handled before this
        self._tracked[submit.request_id] = Tracked(submit, extract_context(msg.headers))
        self._dirty.set()
        return SubmitAck(request_id=submit.request_id, worker_id=self.config.worker_id, state_seq=self.seq,
                         instance=self.instance)

    async def _on_cancel(self, cancel: CancelRequest, msg: Msg) -> None:
        if self.engine is not None and cancel.request_id in self._tracked:
            self.engine.abort(cancel.request_id)
        return None

    # ---- the engine's death ------------------------------------------------------------
    def _on_death_threadsafe(self, error: BaseException) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop already closed: the process is ending anyway
            self._loop.call_soon_threadsafe(self._engine_died.set)

    async def _watch_engine(self) -> None:
        """Once the step thread died: fail every held request, stop the states, exit non-zero."""
        await self._engine_died.wait()
        assert self._thread is not None
        self.engine_dead = True
        logger.critical("gpu_worker %s: the engine step loop died (%r); failing %d requests and exiting with "
                        "status %d", self.config.worker_id, self._thread.error, len(self._tracked), EXIT_ENGINE_DIED)
        for request_id, tracked in list(self._tracked.items()):
            out = RequestOutput(request_id, [], "", finished=True, finish_reason="error",
                                error="the worker's engine stopped", completion_tokens=tracked.tokens)
            self._chunks.put_nowait((tracked.submit.reply_inbox, self._chunk(tracked, out)))
        self._tracked.clear()
        await self._chunks.join()
        assert self.bus is not None
        with contextlib.suppress(Exception):  # exiting regardless: a lost flush only loses chunks
            await self.bus.nc.flush(FLUSH_TIMEOUT_S)
        self.exit_process(EXIT_ENGINE_DIED)

    # ---- outputs out -------------------------------------------------------------------
    def _on_step_threadsafe(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._on_step, outputs, stats)

    def _on_step(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        changed = self._stats is None or _keys(self._stats) != _keys(stats)
        self._stats = stats
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            self._chunks.put_nowait((tracked.submit.reply_inbox, self._chunk(tracked, out)))
            if out.finished:
                self._tracked.pop(out.request_id, None)
                self._finished.append((tracked, out))
                changed = True
        if changed:
            self._dirty.set()

    def _chunk(self, tracked: Tracked, out: RequestOutput) -> Chunk:
        submit = tracked.submit
        now = time.time()
        if out.first_token:
            tracked.first_token, tracked.scheduled = now, out.scheduled_at or now
            tracked.prefill_lora = out.prefill_lora
        chunk = Chunk(request_id=out.request_id, index=tracked.chunks, token_ids=out.new_token_ids,
                      text=out.text_delta, finish_reason=out.finish_reason, worker_id=self.config.worker_id)
        tracked.chunks += 1
        tracked.tokens += len(out.new_token_ids)
        if out.finished:
            prompt = len(submit.prompt_token_ids)
            completion = len(submit.generated_token_ids) + out.completion_tokens
            chunk.usage = Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                                prefill_lora=_prefill_lora_usage(submit, tracked.prefill_lora))
            if out.finish_reason == "error":
                chunk.error = error_info("worker_error", out.error or "the request failed")
        return chunk

    async def _publish_chunks(self) -> None:
        """The one task that publishes chunks, so each request's chunks stay in order.

        Finished requests' spans and metrics are recorded only after their chunks were handed
        to the NATS flusher: telemetry stays off the path to the client.
        """
        while True:
            await self._publish_chunk(*await self._chunks.get())
            self._chunks.task_done()
            while not self._chunks.empty():
                await self._publish_chunk(*self._chunks.get_nowait())
                self._chunks.task_done()
            if self._finished:
                await yield_to_io()
                finished, self._finished = self._finished, []
                for tracked, out in finished:
                    self._record_safely(tracked, out)

    async def _publish_chunk(self, inbox: str, chunk: Chunk) -> None:
        assert self.bus is not None
        try:
            await self.bus.publish(inbox, chunk)
        except Exception:  # a broken inbox must not stop other requests' streams
            logger.exception("cannot publish a chunk of %s", chunk.request_id)

    # ---- state -------------------------------------------------------------------------
    def state(self) -> WorkerState:
        assert self.engine is not None
        stats = self._stats or self.engine.stats()
        known = _keys(stats)
        queued = list(stats.waiting)
        queued += [self._pending_load(t) for rid, t in self._tracked.items() if request_key(rid) not in known]
        return WorkerState(worker_id=self.config.worker_id, model=self.model_name, backend=self.engine.backend,
                           running=list(stats.running), queued=queued, adapters=self._adapter_infos(),
                           free_kv_blocks=stats.free_kv_blocks, total_kv_blocks=stats.total_kv_blocks,
                           block_size=self.engine_config.block_size, max_batch_size=self.engine_config.max_batch_size,
                           max_queued=self.config.max_queued, max_model_len=self.engine.max_model_len, seq=self.seq,
                           timestamp=time.time(), instance=self.instance, assist=self._assist_state(),
                           profile=self.profile.status if self.profile else "")

    def _assist_state(self) -> AssistState | None:
        assert self.engine is not None
        if self.engine.pool is None:
            return None
        a = self.engine.residency.assist_report()
        return AssistState(assisted=a.assisted, fallbacks=a.fallbacks, cpu_layers=a.cpu_layers,
                           pool_workers=a.pool_workers, pool_alive=a.pool_alive, pool_healthy=a.pool_healthy)

    def _pending_load(self, tracked: Tracked) -> RequestLoad:
        s = tracked.submit
        rank = self._rank(s.adapter)
        return RequestLoad(key=request_key(s.request_id), adapter=s.adapter, rank=rank,
                           prompt_tokens=len(s.prompt_token_ids), generated_tokens=len(s.generated_token_ids),
                           remaining_tokens=s.remaining_tokens())

    def _rank(self, adapter: str | None) -> int:
        if adapter is None or self.engine is None:
            return 0
        try:
            return self.engine.residency.rank(adapter)
        except KeyError:
            return 0

    def _adapter_infos(self) -> list[AdapterInfo]:
        assert self.engine is not None
        return self.engine.residency.adapter_infos()

    async def publish_state(self) -> None:
        """Publish the next state; nothing once the engine died (silence tells the fleet it is gone)."""
        assert self.bus is not None
        if self.engine_dead:
            return
        self.seq += 1
        self.last_state = self.state()
        await self.bus.publish(subjects.state(self.config.worker_id), self.last_state)

    async def _publish_states(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.config.state_interval_s)
            self._dirty.clear()
            await yield_to_io()  # a step's chunks are written before the state that follows them
            try:
                await self.publish_state()
            except Exception:
                logger.exception("cannot publish worker state")

    # ---- telemetry ---------------------------------------------------------------------
    def _record_safely(self, tracked: Tracked, out: RequestOutput) -> None:
        try:
            self._record(tracked, out)
        except Exception:  # telemetry must never stop the chunk publisher
            logger.exception("cannot record telemetry of %s", out.request_id)

    def _record_assist(self, tracked: Tracked, attrs: dict, scheduled: float, first: float) -> None:
        lora = tracked.prefill_lora
        if self.telemetry is not None and lora is not None and (lora.cpu_layers or lora.fallback):
            _assist_span(self.telemetry, tracked, attrs, scheduled, first)

    def _record(self, tracked: Tracked, out: RequestOutput) -> None:
        assert self.telemetry is not None
        end = time.time()
        submit = tracked.submit
        attrs = {"worker.id": self.config.worker_id, "adapter": submit.adapter or "", "rank": self._rank(submit.adapter),
                 "request.id": submit.request_id, "prompt_tokens": len(submit.prompt_token_ids),
                 "completion_tokens": out.completion_tokens, "finish_reason": out.finish_reason or ""}
        scheduled = tracked.scheduled or end
        first = tracked.first_token or end
        for name, start, stop in (("worker.queue", tracked.submitted, scheduled), ("worker.prefill", scheduled, first),
                                  ("worker.decode", first, end)):
            span = start_span_at(self.telemetry, name, tracked.parent, attrs, start)
            span.end(end_time=int(max(stop, start) * 1e9))
        self._record_assist(tracked, attrs, scheduled, first)
        m = self.telemetry.metrics
        labels = {"adapter": submit.adapter or "", "worker": self.config.worker_id}
        m.requests.add(1, {**labels, "finish_reason": out.finish_reason or ""})
        timing = TokenTiming.of(tracked.submitted, tracked.first_token, end, out.completion_tokens)
        timing.record(m, labels)
        if self.vllm_metrics is not None:
            self.vllm_metrics.record_request(timing.ttft_s, timing.tpot_s, timing.e2e_s)


def _assist_span(telemetry: Telemetry, tracked: Tracked, attrs: dict, start: float, stop: float) -> None:
    """A ``worker.cpu_assist`` span over an assisted prefill, with an event if it fell back."""
    lora = tracked.prefill_lora
    attrs = {**attrs, "cpu_layers": lora.cpu_layers, "device_layers": lora.device_layers,
             "waited_ms": round(lora.waited_ms, 3)}
    span = start_span_at(telemetry, "worker.cpu_assist", tracked.parent, attrs, start)
    if lora.fallback is not None:
        span.add_event("cpu_assist.fallback", {"reason": lora.fallback})
    span.end(end_time=int(max(stop, start) * 1e9))


def start_span_at(telemetry: Telemetry, name: str, parent: otel_context.Context, attrs: dict, start: float):
    """A span that started at wall time ``start`` (seconds), under ``parent``."""
    from opentelemetry import trace

    if isinstance(telemetry.tracer, trace.NoOpTracer):
        return start_span(telemetry.tracer, name, parent, attrs)
    return telemetry.tracer.start_span(name, context=parent, kind=trace.SpanKind.INTERNAL, attributes=attrs,
                                       start_time=int(start * 1e9))


def _keys(stats: EngineStats) -> set[str]:
    return {r.key for r in stats.running} | {r.key for r in stats.waiting}


def _prefill_lora_usage(submit: WorkerSubmit, lora: PrefillLora | None) -> PrefillLoraUsage | None:
    """The usage's ``prefill_lora`` of a LoRA request that reached its first token (None otherwise)."""
    if submit.adapter is None or lora is None:
        return None
    return PrefillLoraUsage(cpu_layers=lora.cpu_layers, device_layers=lora.device_layers,
                            waited_ms=round(lora.waited_ms, 3))
