"""The worker side of CPU-assisted prefill: cold segments' activations out, their deltas back in.

:class:`AssistExchange` implements :class:`~services.gpu_worker.lora_plan.ExternalDeltas` over
the worker's :class:`~shared.shm_exchange.ExchangeRing`. For one (layer, input group) of a
step, :meth:`start` copies each cold segment's input rows into its request's slot, posts the
job (layer, group, adapter, tokens, how many CPU workers split it) and rings the doorbell
once for all of them; the model then runs the base GEMM while the pool computes. :meth:`finish`
waits (spin, then futex) for the acknowledgements and adds each delta in place.

How many CPU workers a segment gets: ``ceil(tokens / tokens_per_core)``, at most the pool
size, where ``tokens_per_core`` is what one core computes within the device's per-layer time
(``caraserve profile --cpu-prefill`` measures it). Consecutive jobs start at different CPU
workers, so small segments spread over the pool.

A segment whose acknowledgements miss the deadline gets ``source.failed`` and its slot is
quarantined until its late CPU workers are done with it (or, for a worker that died, for
``QUARANTINE_DEADLINES`` deadlines), so a late write can never land in a later request's job.

On CUDA the input copy is asynchronous on the compute stream into the registered (pinned)
ring, and the stream itself writes the job's sequence number after the copy, so the host
never synchronises the stream; the deltas come back with non-blocking copies.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from services.gpu_worker.lora_plan import ColdPart
from shared.shm_exchange import ExchangeRing


QUARANTINE_DEADLINES = 10


@dataclass(frozen=True)
class Posted:
    """One job in flight: its slot, sequence number and which CPU workers compute it."""

    slot: int
    seq: int
    parts: int
    first_worker: int


@dataclass
class ExchangeStats:
    """Where exchange time goes: calls, the stall after the base GEMM, and copy-in/add time."""

    calls: int = 0
    layers: int = 0  # (step, layer) pairs with at least one exchange
    overhead_s: float = 0.0  # copying in + waiting after the base GEMM + adding the deltas
    late: int = 0


class AssistExchange:
    """ExternalDeltas over the shared-memory ring, one job per cold segment per (layer, group)."""

    def __init__(self, ring: ExchangeRing, tokens_per_core: int, deadline_s: float, device: torch.device) -> None:
        self.ring, self.tokens_per_core, self.deadline_s = ring, tokens_per_core, deadline_s
        self.device = device
        self.workers = ring.geometry.num_cpu_workers
        self.stats = ExchangeStats()
        self._next_worker = 0
        self._last_layer = -1
        self._posted: dict[tuple[int, str], tuple[list[Posted], float]] = {}
        self._quarantined: dict[int, tuple[Posted, float]] = {}  # slot -> (late job, release time)
        self._seq_on_device = (torch.zeros(ring.geometry.num_slots, dtype=torch.int32, device=device)
                               if device.type == "cuda" else None)

    @property
    def max_tokens(self) -> int:
        return self.ring.geometry.max_tokens

    def split(self, tokens: int) -> int:
        """How many CPU workers compute a segment of ``tokens`` tokens."""
        return max(1, min(self.workers, math.ceil(tokens / self.tokens_per_core)))

    def start(self, layer: int, group: str, x: torch.Tensor, parts: list[ColdPart]) -> None:
        began = time.perf_counter()
        if layer != self._last_layer:
            self.stats.layers, self._last_layer = self.stats.layers + 1, layer
        posted = [self._post(layer, group, x, part) for part in parts]
        self.ring.ring_doorbell()
        self._posted[(layer, group)] = (posted, began)
        self.stats.overhead_s += time.perf_counter() - began

    def _post(self, layer: int, group: str, x: torch.Tensor, part: ColdPart) -> Posted:
        slot, n = part.source.slot, part.end - part.start
        parts, first = self.split(n), self._next_worker
        self._next_worker = (first + parts) % self.workers
        rows = self.ring.input_view(slot, group, n)
        if self._seq_on_device is None:
            rows.copy_(x[part.start:part.end])
            seq = self.ring.post(slot, layer, group, part.source.adapter_id, n, parts, first)
        else:
            rows.copy_(x[part.start:part.end], non_blocking=True)
            seq = self.ring.post(slot, layer, group, part.source.adapter_id, n, parts, first, publish=False)
            self._seq_on_device[slot].fill_(seq)  # the stream writes the flag after the copy: no host sync
            self.ring.seq_view(slot).copy_(self._seq_on_device[slot:slot + 1], non_blocking=True)
        return Posted(slot, seq, parts, first)

    def finish(self, layer: int, group: str, ys: dict[str, torch.Tensor], parts: list[ColdPart]) -> None:
        posted, began = self._posted.pop((layer, group))
        deadline = began + self.deadline_s
        waited = time.perf_counter()
        for part, job in zip(parts, posted):
            if not self.ring.wait_done(job.slot, job.seq, job.parts, job.first_worker, deadline):
                part.source.failed = (f"the CPU prefill pool missed the {self.deadline_s * 1e3:.0f} ms deadline "
                                      f"for layer {layer} ({group})")
                self._quarantined[job.slot] = (job, time.monotonic() + QUARANTINE_DEADLINES * self.deadline_s)
                self.stats.late += 1
                continue
            n = part.end - part.start
            for proj in part.projs:
                delta = self.ring.output_view(job.slot, proj, n)
                ys[proj][part.start:part.end].add_(delta.to(self.device, non_blocking=True))
        self.stats.calls += 1
        self.stats.overhead_s += time.perf_counter() - waited

    def slot_free(self, slot: int) -> bool:
        """May ``slot`` take a new request? (A quarantined slot is free once its late job is done.)"""
        late = self._quarantined.get(slot)
        if late is None:
            return True
        job, release = late
        if time.monotonic() >= release or self.ring.is_done(job.slot, job.seq, job.parts, job.first_worker):
            del self._quarantined[slot]
            return True
        return False
