"""The multi-LoRA engine: continuous batching over one base model and many adapters.

One step is ``plan = admission.schedule()`` -> ``runner.run(plan)`` -> ``self._update(...)``.
``add_request`` and ``abort`` are thread-safe: they queue commands that the step loop
applies at the start of the next step, so a service can call them from its event loop
while another thread runs :meth:`step`.

A failure inside a step never stops the engine (see :meth:`LLMEngine.step`): the requests it
can be pinned on finish with reason ``error`` (their KV blocks freed), the others go on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.gpu_worker.admission import Admission, StepPlan
from services.gpu_worker.engine_config import EngineConfig
from services.gpu_worker.kv_cache import BlockManager, allocate_cache, blocks_for_budget
from services.gpu_worker.lora_ops import get_backend, residency_layout, triton_lora_kernel
from services.gpu_worker.model import LlamaModel
from services.gpu_worker.request import (DuplicateRequestError, EngineRequest, RequestError, RequestOutput,
                                        UnknownAdapterRequestError)
from services.gpu_worker.residency.config import ResidencyConfig
from services.gpu_worker.residency.factory import Built, Model, make_residency
from services.gpu_worker.residency.pool_health import PoolHealth
from services.gpu_worker.residency.protocol import AdapterResidency, UnknownAdapterError
from services.gpu_worker.runner import ModelRunner, StepResult
from services.gpu_worker.sampling import is_greedy, make_generator
from services.gpu_worker.sequence import Sequence, Status
from shared.schemas.names import request_key
from shared.schemas.worker_state import RequestLoad
from shared.tokenizer import IncrementalDetokenizer, load_tokenizer

if TYPE_CHECKING:
    from services.gpu_worker.decode_graph import DecodeGraphs

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class EngineStats:
    """The engine's requests as worker state reports them (by key, never by id)."""

    running: list[RequestLoad]
    waiting: list[RequestLoad]
    free_kv_blocks: int
    total_kv_blocks: int


class LLMEngine:
    """Serves one base model with many LoRA adapters in mixed continuous batches."""

    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None,
                 adapters: dict[str, str | Path] | None = None, residency: ResidencyConfig | Built | None = None,
                 worker_id: str = "local") -> None:
        """``adapters``: registered at start (NAME -> PEFT dir). ``residency``: the residency config, or a
        residency built by the caller (benches sharing a host store); None preloads ``adapters`` onto the
        device before the constructor returns (cached mode)."""
        self.config = config or EngineConfig()
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        device = self.config.resolved_device()
        self.dtype = DTYPES[self.config.dtype]
        self.model = LlamaModel(model_dir, self.dtype, device)
        self.tokenizer = load_tokenizer(model_dir)
        mc = self.model.config
        self.max_model_len = min(self.config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.eos_ids = set(mc.eos_token_ids) | ({self.tokenizer.eos_token_id} - {None})
        built = residency if isinstance(residency, Built) else make_residency(
            residency or ResidencyConfig(cold_start="cached"),
            Model(mc.shape, self.config.max_lora_rank, self.dtype, device, self.config.max_batched_tokens,
                  str(model_dir), residency_layout(device, self.config.native_ops)), worker_id, adapters)
        self.residency: AdapterResidency = built.residency
        self.pool: PoolHealth | None = built.pool  # cpu_assist: the CPU prefill pool's health
        if residency is None:
            self._preload()
        self.blocks = BlockManager(self._num_blocks(), self.config.block_size)
        # one block more than the manager hands out: the scratch block of captured decode steps' padded rows
        kv = allocate_cache(mc.shape.num_layers, self.blocks.num_blocks + 1, self.config.block_size,
                            mc.shape.num_kv_heads, mc.shape.head_dim, self.dtype, device)
        self.backend = self.config.starting_backend()  # the kernel family of the steps from the next one on
        self.runner = ModelRunner(self.model, self.blocks, kv, self.residency, self.backend, self.config.native_ops,
                                  self._decode_graphs(kv))
        self.admission = Admission(self.blocks, self.residency, self.config.max_batch_size,
                                   self.config.max_batched_tokens)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, Sequence] = {}  # every request added and not finished, by id
        self._ids_lock = threading.Lock()
        self._wake = threading.Event()
        self.idle = True  # the last step had nothing to run
        self.last_plan: StepPlan | None = None  # what the last step ran (profiling, inspection)
        self.steps = 0
        self.num_preemptions = 0
        self.record_logits = False  # attach each step's float32 logits to outputs (tests, debugging)

    def _preload(self) -> None:
        """Load every adapter onto the device now (cached mode without a residency config)."""
        while self.residency.pending_loads():
            self.residency.poll()
            self.residency.wait_for_progress(0.05)
        self.residency.poll()

    def _decode_graphs(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> "DecodeGraphs | None":
        """CUDA-graph replay of decode steps, every one recorded now (see decode_graph.py): on CUDA, when
        ``cuda_graphs`` and ``native_ops`` are on and triton is installed (its kernels run in the graphs)."""
        if not (self.config.cuda_graphs and self.config.native_ops and self.model.device.type == "cuda"
                and triton_lora_kernel() is not None):
            return None
        from services.gpu_worker.decode_graph import DecodeGraphs  # imports triton, which only CUDA needs

        graphs = DecodeGraphs(self.model, kv, self.blocks.num_blocks, self.config.max_batch_size,
                              self.blocks.blocks_needed(self.max_model_len), self.config.max_lora_rank)
        graphs.capture_all()
        return graphs

    def _num_blocks(self) -> int:
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        s = self.model.config.shape
        return blocks_for_budget(self.config.kv_cache_bytes, s.num_layers, self.config.block_size,
                                 s.num_kv_heads, s.head_dim, self.dtype)

    # ---- requests in -------------------------------------------------------------------
    def add_request(self, request: EngineRequest) -> None:
        """Validate and queue a request (thread-safe). Raises RequestError when invalid."""
        seq = self._make_sequence(request)
        with self._ids_lock:
            if request.request_id in self._live:
                raise DuplicateRequestError(f"duplicate request_id {request.request_id!r}")
            self._live[request.request_id] = seq
        self._commands.put(("add", seq))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe); it finishes with reason ``cancelled``."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    def set_backend(self, backend: str) -> None:
        """Run the steps from the next one on with kernel family ``backend`` (thread-safe). Both
        families compute the same result from the same adapter weights; only the cost differs."""
        get_backend(backend)  # refuses an unknown name here, not in the step loop
        self.backend = backend
        self._commands.put(("backend", backend))
        self._wake.set()

    def wake(self) -> None:
        """Wake a step loop blocked in :meth:`wait_for_work`."""
        self._wake.set()

    def wait_for_work(self, timeout: float) -> None:
        """Block a step loop that had nothing to run until a request arrives, a load
        progresses or ``timeout`` passes."""
        if self.residency.loads_in_flight():
            self.residency.wait_for_progress(min(timeout, 0.01))
        else:
            self._wake.wait(timeout)
        self._wake.clear()

    def _make_sequence(self, request: EngineRequest) -> Sequence:
        ids = list(request.prompt_token_ids)
        if not ids:
            raise RequestError("prompt is empty")
        vocab = self.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise RequestError(f"prompt has {len(ids)} tokens; the context limit is {self.max_model_len}")
        rank = 0
        if request.adapter is not None:
            try:
                rank = self.residency.rank(request.adapter)
            except UnknownAdapterError as exc:
                raise UnknownAdapterRequestError(str(exc)) from None
        seq = Sequence(request.request_id, ids, request.adapter, request.params, rank=rank)
        seq.generator = None if is_greedy(request.params) else make_generator(request.params.seed)
        resumed = request.resumed_tokens
        if not 0 <= resumed < len(ids):
            raise RequestError(f"resumed_tokens must be in [0, {len(ids)}) for {len(ids)} prompt tokens")
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, ids[:len(ids) - resumed])
        self._replay_text(seq, ids[len(ids) - resumed:])
        return seq

    @staticmethod
    def _replay_text(seq: Sequence, streamed_ids: list[int]) -> None:
        """Detokenize tokens an earlier engine streamed, one at a time as it did, without emitting.

        Its text becomes this sequence's text, and as much of it counts as emitted as that
        engine's :meth:`_delta` had released (all but the stop-string hold-back).
        """
        for token in streamed_ids:
            seq.text += seq.detokenizer.step([token])
        hold = max(len(s) for s in seq.params.stop) - 1 if seq.params.stop else 0
        seq.emitted_chars = max(0, len(seq.text) - hold)

    def _apply_commands(self) -> list[RequestOutput]:
        outputs = []
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return outputs
            try:
                outputs += self._apply_command(kind, arg)
            except Exception as exc:
                log.exception("applying %s %s failed", kind, arg.request_id if kind == "add" else arg)
                if kind == "add":
                    outputs.append(self._fail(arg, exc))

    def _apply_command(self, kind: str, arg: Sequence | str) -> list[RequestOutput]:
        if kind == "backend":
            self.runner.set_backend(arg)
            return []
        if kind == "add":
            if arg.status == Status.FINISHED:
                return []  # failed before it was applied (a failed step fails every live request)
            self.admission.add(arg)
            if arg.adapter is not None:
                self.residency.prefetch(arg.adapter)
            return []
        seq = self.admission.remove(arg)
        return [] if seq is None else [self._finish(seq, "cancelled")]

    # ---- the step loop -----------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self.admission.running or self.admission.waiting or not self._commands.empty())

    def step(self) -> list[RequestOutput]:
        """Run one engine iteration; returns what each affected request produced.

        An exception inside the step fails only the requests it can be pinned on, each with a
        final ``error`` output: one request's token handling (detokenizing, stop matching) fails
        that request; when running the batch (model, LoRA, sampling) fails, each of its requests
        is run alone and those that fail alone too fail; planning the step (adapter polling,
        admission) fails every request the engine holds, since the engine cannot tell which one
        broke it. Then the engine goes on with the next step.
        """
        outputs = self._apply_commands()
        try:
            plan = self._plan(outputs)
        except Exception as exc:
            with self._ids_lock:
                live = list(self._live.values())
            log.exception("planning step %d failed; failing all %d requests", self.steps, len(live))
            self.idle = True
            return outputs + [self._fail(seq, exc) for seq in live]
        if not plan:
            return outputs
        try:
            result = self.runner.run(plan)
        except Exception:
            log.exception("step %d failed; running its requests one by one", self.steps)
            self.steps += 1
            return outputs + self._run_one_by_one(plan)
        self.steps += 1
        for i, (seq, token) in enumerate(zip(result.seqs, result.tokens)):
            if seq.request_id in result.fell_back:
                self.admission.fall_back(seq, result.fell_back[seq.request_id])
                continue
            outputs.append(self._append_token_or_fail(seq, token))
            if self.record_logits:
                outputs[-1].logits = result.logits[i]
        return outputs

    def _plan(self, outputs: list[RequestOutput]) -> StepPlan:
        """Poll adapter loads, fail what can never run and schedule this step (appends to ``outputs``)."""
        self.residency.poll()
        outputs += self._fail_unservable()
        plan = self.admission.schedule()
        outputs += [self._finish(seq, "error", reason) for seq, reason in plan.rejected]
        self.num_preemptions += len(plan.preempted)
        self.idle = not plan
        self.last_plan = plan
        now = time.time()
        for seq in plan.prefill:
            seq.scheduled_at = seq.scheduled_at or now
        return plan

    def _run_one_by_one(self, plan: StepPlan) -> list[RequestOutput]:
        """After a batch failed: run each of its requests alone. One that fails alone too is the
        culprit (or the failure is not its own to survive) and fails; the others go on."""
        outputs = []
        singles = [(s, StepPlan(prefill=[s])) for s in plan.prefill] + [(s, StepPlan(decode=[s])) for s in plan.decode]
        for seq, single in singles:
            try:
                result = self.runner.run(single)
            except Exception as exc:
                log.exception("request %s failed alone", seq.request_id)
                outputs.append(self._fail(seq, exc))
                continue
            if seq.request_id in result.fell_back:
                self.admission.fall_back(seq, result.fell_back[seq.request_id])
                continue
            outputs.append(self._append_token_or_fail(seq, result.tokens[0]))
            if self.record_logits:
                outputs[-1].logits = result.logits[0]
        return outputs

    def _fail_unservable(self) -> list[RequestOutput]:
        """Finish waiting requests whose adapter can never load (unloaded, unusable, too big)."""
        failed = [(s, self.residency.failure(s.adapter)) for s in self.admission.waiting if s.adapter is not None]
        return [self._finish(s, "error", reason) for s, reason in failed if reason is not None]

    def run_plan(self, plan: StepPlan) -> StepResult:
        """Run an explicit plan (profiling and tests)."""
        return self.runner.run(plan)

    def _append_token_or_fail(self, seq: Sequence, token: int) -> RequestOutput:
        try:
            return self._append_token(seq, token)
        except Exception as exc:
            log.exception("request %s failed handling token %d", seq.request_id, token)
            return self._fail(seq, exc)

    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        first = not seq.output_ids
        seq.output_ids.append(token)
        seq.text += seq.detokenizer.step([token])
        reason = self._stop_reason(seq, token)
        if reason is not None:
            return self._finish(seq, reason, first=first, token=token)
        return self._delta(seq, [token], first, final=False)

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            return "stop"
        if p.stop and self._truncate_at_stop(seq):
            return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def _truncate_at_stop(seq: Sequence) -> bool:
        """Cut ``seq.text`` before the first stop string (searching only new text)."""
        window = max(len(s) for s in seq.params.stop)
        from_pos = max(0, seq.emitted_chars - window)
        hits = [i for i in (seq.text.find(s, from_pos) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        seq.text = seq.text[:min(hits)]
        return True

    def _delta(self, seq: Sequence, new_ids: list[int], first: bool, final: bool) -> RequestOutput:
        hold = 0 if final or not seq.params.stop else max(len(s) for s in seq.params.stop) - 1
        end = max(seq.emitted_chars, len(seq.text) - hold)
        text = seq.text[seq.emitted_chars:end]
        seq.emitted_chars = end
        return RequestOutput(seq.request_id, new_ids, text, prompt_tokens=len(seq.prompt_ids),
                             completion_tokens=len(seq.output_ids), first_token=first,
                             scheduled_at=seq.scheduled_at if first else None,
                             prefill_lora=replace(seq.prefill_lora) if first else None)

    def _retire(self, seq: Sequence) -> None:
        """Take ``seq`` out of the engine for good: its KV blocks and adapter are released."""
        if seq.status != Status.FINISHED:
            self.admission.remove(seq.request_id)
            self.blocks.free(seq.request_id)  # no-op unless a failed step left it half admitted
        seq.status = Status.FINISHED
        with self._ids_lock:
            self._live.pop(seq.request_id, None)

    def _fail(self, seq: Sequence, exc: Exception) -> RequestOutput:
        """Finish ``seq`` with reason ``error`` after an internal failure, leaving its text alone
        (it may be what broke). The message names the exception's type only: its text may show
        internals, and the log has the traceback."""
        self._retire(seq)
        return RequestOutput(seq.request_id, [], "", finished=True, finish_reason="error",
                             error=f"the engine failed while serving this request ({type(exc).__name__})",
                             prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids))

    def _finish(self, seq: Sequence, reason: str, error: str | None = None, first: bool = False,
                token: int | None = None) -> RequestOutput:
        self._retire(seq)
        if reason in ("length", "cancelled") or (reason == "stop" and not seq.params.stop):
            seq.text += seq.detokenizer.flush()
        out = self._delta(seq, [] if token is None else [token], first, final=True)
        out.finished, out.finish_reason = True, reason
        out.error = error if reason == "error" else None
        return out

    def close(self) -> None:
        """Stop adapter loads and release shared memory (the CPU prefill ring and host segments)."""
        self.residency.close()

    # ---- state for the worker service --------------------------------------------------
    def stats(self) -> EngineStats:
        info = lambda s: RequestLoad(key=request_key(s.request_id), adapter=s.adapter, rank=s.rank,  # noqa: E731
                                     prompt_tokens=len(s.prompt_ids), generated_tokens=len(s.output_ids),
                                     remaining_tokens=s.remaining_tokens)
        return EngineStats([info(s) for s in self.admission.running], [info(s) for s in self.admission.waiting],
                           self.blocks.num_free_blocks, self.blocks.num_blocks)
