"""Decode steps replayed as captured CUDA graphs, one per batch size and LoRA mode.

A decode step of a small model on a GPU is mostly launch overhead: hundreds of small kernels
whose launches cost more than their work. A CUDA graph records a step's kernels once and then
replays them with one launch. Replay reuses the recorded arguments, so each step's inputs are
copied into static buffers first:

* the tokens: ids, positions, the cache rows their K/V go to, block tables ``[S, W]`` (``W``
  blocks cover ``max_model_len``) and context lengths (:class:`StaticInputs`);
* the LoRA segments and pointer tables (:class:`~services.gpu_worker.graph_lora.StaticLoraTables`).

Attention is the Triton paged kernel (triton_attention.py), whose launch does not depend on the
contexts' lengths; LoRA is the Triton shrink/expand pair over the static tables.

A step of ``n`` sequences replays the graph of the smallest captured size ``>= n`` (1, 2, 4, then
multiples of 8 up to ``max_batch_size``). Its padded rows read token 0 at position 0 and write
their K/V into the cache's scratch block (the one block the block manager never hands out), so
they disturb no sequence; their logits are dropped. The engine records every (size, LoRA mode)
when it starts (:meth:`DecodeGraphs.capture_all`, on padding rows alone): a warm-up run (Triton
compiles there, outside the capture), then the capture; every graph draws on one shared memory
pool. A capture that fails leaves that step running eagerly from the same buffers.

Eligible steps: decode only, every adapter fully served from the device (no CPU-computed
deltas) and at most ``max_batch_size`` sequences. Others run eagerly.

On a CPU there is nothing to capture: the same static-buffer step runs eagerly (the Triton
kernels in Triton's interpreter under ``TRITON_INTERPRET=1``). The tests check it that way against
the eager path, in float32 (in bf16 the CPU's native kernels keep K in a paired layout that the
static step, written for CUDA, does not read); on CUDA, ``python -m bench.accelerator`` checks and
times the replay.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from services.gpu_worker.attention import write_kv_rows
from services.gpu_worker.graph_lora import StaticLoraTables
from services.gpu_worker.model import LlamaModel
from services.gpu_worker.step_batch import StepBatch
from services.gpu_worker.triton_attention import paged_decode_attention

log = logging.getLogger(__name__)


def capture_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes graphs are captured for: 1, 2, 4, then multiples of 8, up to ``max_batch_size``."""
    sizes = [s for s in (1, 2, 4) if s < max_batch_size] + list(range(8, max_batch_size, 8))
    return sizes + [max_batch_size]


@dataclass
class StaticInputs:
    """A captured step's token inputs, sized for the largest batch ``S``.

    ``input_ids``, ``positions``, ``lengths: [S]``; ``write_rows: [S * KVH]`` (see
    AttentionMetadata.write_rows); ``tables: [S, W]`` block ids.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    write_rows: torch.Tensor
    tables: torch.Tensor
    lengths: torch.Tensor

    @classmethod
    def allocate(cls, size: int, kv_heads: int, width: int, device: torch.device) -> "StaticInputs":
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.int64, device=device)  # noqa: E731
        return cls(zeros(size), zeros(size), zeros(size * kv_heads), zeros(size, width), zeros(size))


@dataclass
class StaticDecodeAttention:
    """The :class:`~services.gpu_worker.attention.StepAttention` of a captured step of ``B`` tokens:
    ``rows: [B * KVH]``, ``tables: [B, W]``, ``lengths: [B]`` are views of the static inputs."""

    rows: torch.Tensor
    tables: torch.Tensor
    lengths: torch.Tensor

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor,
               cache_v: torch.Tensor) -> torch.Tensor:
        """Write the step's K/V, then attend with the Triton paged kernel: ``q: [B, H, D]`` -> ``[B, H * D]``."""
        write_kv_rows(k, v, cache_k, cache_v, self.rows)
        return paged_decode_attention(q, cache_k, cache_v, self.tables, self.lengths).flatten(1)


class DecodeGraphs:
    """Captures and replays decode steps (see the module docstring)."""

    def __init__(self, model: LlamaModel, kv: list[tuple[torch.Tensor, torch.Tensor]], scratch_block: int,
                 max_batch_size: int, max_blocks: int, max_rank: int) -> None:
        self.model, self.kv = model, kv
        self.sizes = capture_sizes(max_batch_size)
        self.capture = model.device.type == "cuda"
        self.kv_heads, block_size = kv[0][0].shape[1], kv[0][0].shape[2]
        self.max_blocks = max_blocks
        self.inputs = StaticInputs.allocate(max_batch_size, self.kv_heads, max_blocks, model.device)
        self.lora = StaticLoraTables(len(kv), max_batch_size, max_rank, model.dtype, model.device)
        slot0 = torch.arange(self.kv_heads, device=model.device) * block_size
        self.scratch_block = scratch_block
        self.scratch_rows = (scratch_block * self.kv_heads * block_size + slot0).repeat(max_batch_size)
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._steps: dict[tuple[int, bool | None], Callable[[], torch.Tensor]] = {}
        self.replays = 0

    @property
    def captured(self) -> list[tuple[int, bool | None]]:
        """The (batch size, LoRA mode) of every step recorded so far (mode None: no adapters)."""
        return list(self._steps)

    def fits(self, batch: StepBatch) -> bool:
        """Whether a step can replay a graph: decode only, at most the largest size, every segment's
        adapter on the device with nothing external, and no table wider than ``max_blocks``."""
        return (batch.decode_only and 0 < len(batch.seqs) <= self.sizes[-1]
                and all(g.tables.shape[1] <= self.max_blocks for g in batch.meta.decode)
                and all(s.adapter is not None and s.external is None for s in batch.segments))

    def capture_all(self) -> None:
        """Record every (size, LoRA mode) now, largest first, on padding rows alone (they touch only the
        scratch block), so that serving never waits for a capture."""
        started = time.monotonic()
        for size in reversed(self.sizes):
            for padded in (None, True, False):
                self._pad(0, size)
                self.lora.fill([])
                self._steps[(size, padded)] = self._record(size, padded)
        log.info("recorded %d decode steps in %.1f s", len(self._steps), time.monotonic() - started)

    def run(self, batch: StepBatch, padded: bool) -> torch.Tensor:
        """Float32 logits ``[n, vocab]`` of a decode-only StepBatch of ``n`` sequences (see :meth:`fits`);
        ``padded``: the LoRA backend pads ranks (BGMV)."""
        n = len(batch.seqs)
        size = next(s for s in self.sizes if s >= n)
        self._fill(batch, n)
        self._pad(n, size)
        key = (size, padded if batch.segments else None)
        if key not in self._steps:
            self._steps[key] = self._record(size, key[1])
        self.replays += 1
        return self._steps[key]()[:n]

    def _fill(self, batch: StepBatch, n: int) -> None:
        """Copy the step's inputs into rows ``0..n`` of the static buffers, and its LoRA tables."""
        s, kvh = self.inputs, self.kv_heads
        s.input_ids[:n].copy_(batch.input_ids)
        s.positions[:n].copy_(batch.positions)
        s.write_rows[:n * kvh].copy_(batch.meta.write_rows)
        for group in batch.meta.decode:
            s.tables[group.idx, :group.tables.shape[1]] = group.tables
            s.lengths[group.idx] = group.lengths
        self.lora.fill(batch.segments)

    def _pad(self, n: int, size: int) -> None:
        """Rows ``n..size`` become padding: token 0 at position 0, K/V written to and read from the scratch block."""
        s, kvh = self.inputs, self.kv_heads
        s.input_ids[n:size] = 0
        s.positions[n:size] = 0
        s.write_rows[n * kvh:size * kvh] = self.scratch_rows[:(size - n) * kvh]
        s.tables[n:size, 0] = self.scratch_block
        s.lengths[n:size] = 1

    def _record(self, size: int, padded: bool | None) -> Callable[[], torch.Tensor]:
        """The step of ``size`` tokens (LoRA mode ``padded``; None: no adapters), captured on CUDA."""
        s, kvh = self.inputs, self.kv_heads
        attention = StaticDecodeAttention(s.write_rows[:size * kvh], s.tables[:size], s.lengths[:size])
        lora = self.lora.hooks(size, padded) if padded is not None else None

        def step() -> torch.Tensor:
            with torch.inference_mode():
                hidden = self.model.forward(s.input_ids[:size], s.positions[:size], attention, self.kv, lora)
                return self.model.logits(hidden)

        if not self.capture:
            step()  # the warm-up run a capture starts with (a CPU has nothing more to record)
            return step
        try:
            return self._capture(step)
        except RuntimeError as exc:  # the step still runs, uncaptured, from the same buffers
            log.warning("capturing the decode step of %d tokens failed, it runs eagerly: %s", size,
                        str(exc).splitlines()[0])
            return step

    def _capture(self, step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """``step`` recorded as a CUDA graph, after a warm-up run (Triton compiles, cuBLAS sets up there).

        ``thread_local``: the residency's loader and host-warming threads may allocate and copy
        while a capture runs; only this thread's CUDA calls are checked against the capture.
        """
        warm = torch.cuda.Stream()
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm):
            step()
        torch.cuda.current_stream().wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = step()

        def replay() -> torch.Tensor:
            graph.replay()
            return logits

        return replay
