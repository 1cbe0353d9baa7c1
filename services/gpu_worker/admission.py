"""Iteration-level admission: which sequences run in the next engine step.

Each step decodes every running sequence and admits waiting ones (FIFO, skipping those
whose adapter residency says ``WAIT``) while the batch-size, token and KV-block budgets
allow. A request whose adapter is cold runs at once when the cold-start strategy says
``ASSISTED`` (CPU-computed deltas for the layers not resident yet).
When a running sequence cannot get a KV block for its next token, the most recently
admitted running sequence is preempted: its blocks are freed and it goes back to the
front of the waiting queue, to be recomputed (prompt + tokens so far) later.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from services.gpu_worker.kv_cache import BlockManager
from services.gpu_worker.residency.cold_start import Admit
from services.gpu_worker.residency.protocol import AdapterResidency
from services.gpu_worker.sequence import Sequence, Status


@dataclass
class StepPlan:
    """What one engine step computes: a plain data object."""

    prefill: list[Sequence] = field(default_factory=list)
    decode: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    rejected: list[tuple[Sequence, str]] = field(default_factory=list)  # can never be scheduled

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.prefill) + len(self.decode)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


class Admission:
    """Owns the waiting queue and the running set."""

    def __init__(self, blocks: BlockManager, residency: AdapterResidency, max_batch_size: int,
                 max_batched_tokens: int) -> None:
        self.blocks, self.residency = blocks, residency
        self.max_batch_size, self.max_batched_tokens = max_batch_size, max_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, request_id: str) -> Sequence | None:
        """Take a sequence out of the engine (abort or finish), freeing its blocks."""
        for seq in list(self.running):
            if seq.request_id == request_id:
                self.running.remove(seq)
                self._release(seq)
                return seq
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return seq
        return None

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.request_id)
        if seq.adapter is not None:
            self.residency.release(seq.request_id, seq.adapter)

    def fall_back(self, seq: Sequence, reason: str) -> None:
        """An assisted step of ``seq`` missed its CPU deltas (``reason``): it goes back to the front
        of the queue and waits for its adapter's load (its KV blocks are freed, its step discarded)."""
        seq.prefill_lora.fallback = reason
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.assist_failed = True
        seq.waiting_since = time.monotonic()
        self.waiting.appendleft(seq)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        self._schedule_decodes(plan)
        if not plan.preempted:
            self._admit_waiting(plan)
        return plan

    def _schedule_decodes(self, plan: StepPlan) -> None:
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted below while making room
            while not self.blocks.can_append(seq.request_id, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq in self.running:
                self.blocks.append(seq.request_id, seq.num_tokens)
                plan.decode.append(seq)

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    def _admit_waiting(self, plan: StepPlan) -> None:
        budget = self.max_batched_tokens - len(plan.decode)
        skipped: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting.popleft()
            verdict = self._verdict(seq)
            if verdict is Admit.WAIT:
                skipped.append(seq)  # its adapter is loading; later requests may go ahead
                continue
            if self.blocks.blocks_needed(seq.num_tokens) > self.blocks.num_blocks:
                plan.rejected.append((seq, f"needs {seq.num_tokens} tokens of KV cache, more than the whole cache"))
                continue
            lone = not plan
            if (seq.num_tokens > budget and not lone) or not self.blocks.can_allocate(seq.num_tokens):
                self.waiting.appendleft(seq)
                break
            self.blocks.allocate(seq.request_id, seq.num_tokens)
            if seq.adapter is not None:
                self.residency.acquire(seq.request_id, seq.adapter, verdict)
            self._note_wait(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.prefill.append(seq)
            budget -= seq.num_tokens
        self.waiting.extendleft(reversed(skipped))

    def _verdict(self, seq: Sequence) -> Admit:
        if seq.adapter is None:
            return Admit.DEVICE
        verdict = self.residency.admit(seq.adapter, seq.num_tokens, assist=not seq.assist_failed)
        if verdict is Admit.WAIT and seq.waiting_since is None:
            seq.waiting_since = time.monotonic()
        return verdict

    @staticmethod
    def _note_wait(seq: Sequence) -> None:
        """Record how long ``seq`` waited for its adapter before this prefill."""
        if seq.waiting_since is not None:
            seq.prefill_lora.waited_ms += (time.monotonic() - seq.waiting_since) * 1e3
            seq.waiting_since = None
