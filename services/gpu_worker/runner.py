"""Turns a StepPlan into tensors, runs the model once and samples one token per sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from services.gpu_worker.admission import StepPlan
from services.gpu_worker.attention import AttentionMetadata, DecodeGroup, PrefillGroup, native_decode
from services.gpu_worker.kv_cache import BlockManager
from services.gpu_worker.lora_ops import device_op
from services.gpu_worker.lora_plan import LoraSegment, LoraStep, WeightLists
from services.gpu_worker.residency.protocol import AdapterResidency
from services.gpu_worker.model import LlamaModel
from services.gpu_worker.sampling import sample
from services.gpu_worker.sequence import Sequence
from services.gpu_worker.step_batch import StepBatch

if TYPE_CHECKING:  # decode_graph imports triton, which only CUDA engines need
    from services.gpu_worker.decode_graph import DecodeGraphs


@dataclass
class StepResult:
    """What one step computed: the sequences in batch order, their sampled tokens and float32 logits
    ``[N, vocab]``, and the assisted sequences whose CPU deltas were late (their token is invalid)."""

    seqs: list[Sequence]
    tokens: list[int]
    logits: torch.Tensor
    fell_back: dict[str, str]  # request id -> why


def layer_split(seg: LoraSegment) -> tuple[int, int]:
    """``(cpu layers, device layers)`` of ``seg`` this step: layers with a CPU-computed delta, and
    layers whose every delta comes from the device."""
    device = {layer for layer, _ in seg.adapter.weights} if seg.adapter is not None else set()
    cpu = {layer for layer, proj in seg.external.targets
           if seg.adapter is None or (layer, proj) not in seg.adapter.weights} if seg.external is not None else set()
    return len(cpu), len(device - cpu)


MIN_DECODE_GROUP = 8  # sequences; smaller groups cost more in per-op overhead than they save in padding
MAX_DECODE_GROUPS = 4


def decode_groups(lengths: list[int]) -> list[list[int]]:
    """Split decoding sequences (by index) into groups of similar context length.

    Each group's attention is padded to its own longest context, so grouping sorted lengths
    saves the padding a single group would gather and attend over. Groups have equal counts
    and at least MIN_DECODE_GROUP sequences; one group keeps the batch order.
    """
    if not lengths:
        return []
    count = min(MAX_DECODE_GROUPS, len(lengths) // MIN_DECODE_GROUP)
    if count <= 1:
        return [list(range(len(lengths)))]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    size = -(-len(order) // count)
    return [order[i:i + size] for i in range(0, len(order), size)]


def _add_segment(segments: list[LoraSegment], seg: LoraSegment) -> None:
    """Append ``seg``, merging it into the previous segment when both are the same resident adapter
    on adjacent tokens (the LoRA kernel then reads that adapter's weights once for all of them)."""
    prev = segments[-1] if segments else None
    if (prev is not None and prev.end == seg.start and prev.adapter is seg.adapter and prev.adapter is not None
            and prev.external is None and seg.external is None):
        prev.end = seg.end
    else:
        segments.append(seg)


class ModelRunner:
    """Executes steps of the model for the engine."""

    def __init__(self, model: LlamaModel, blocks: BlockManager, kv: list[tuple[torch.Tensor, torch.Tensor]],
                 residency: AdapterResidency, backend: str, use_native: bool,
                 graphs: DecodeGraphs | None = None) -> None:
        """``backend``: the LoRA kernel family (bgmv/mbgmv), ``use_native``: its compiled kernels
        where they build; ``graphs``: replays eligible decode steps as CUDA graphs."""
        self.model, self.blocks, self.kv, self.residency = model, blocks, kv, residency
        self.use_native, self.graphs = use_native, graphs
        self.device = model.device
        self.weight_lists = WeightLists()  # the steps' per-(layer, projection) adapter lists, while unchanged
        self.set_backend(backend)

    def set_backend(self, backend: str) -> None:
        """Run the next steps' LoRA with kernel family ``backend``."""
        self.backend = backend
        self.lora_op = device_op(backend, self.device, self.use_native)

    def build(self, plan: StepPlan) -> StepBatch:
        """Order sequences by adapter (so each adapter's tokens are one run) and flatten them."""
        entries = [(s, True) for s in plan.prefill] + [(s, False) for s in plan.decode]
        entries.sort(key=lambda e: (e[0].adapter is None, e[0].adapter or ""))
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefill_ranges, decode_idx, last, segments = [], [], [], []
        for seq, prefill in entries:
            start = len(ids)
            if prefill:
                ids += seq.all_ids
                positions += range(seq.num_tokens)
                slots += self.blocks.slots(seq.request_id, 0, seq.num_tokens)
                prefill_ranges.append((start, len(ids)))
            else:
                ids.append(seq.all_ids[-1])
                positions.append(seq.num_tokens - 1)
                slots.append(self.blocks.slot(seq.request_id, seq.num_tokens - 1))
                decode_idx.append(start)
            last.append(len(ids) - 1)
            if seq.adapter is not None:
                seg = LoraSegment(start, len(ids), self.residency.device_adapter(seq.adapter),
                                  self.residency.external(seq.request_id, seq.adapter))
                if prefill:
                    seq.prefill_lora.cpu_layers, seq.prefill_lora.device_layers = layer_split(seg)
                _add_segment(segments, seg)
        prefilling = [e[0] for e in entries if e[1]]
        meta = AttentionMetadata(self._write_rows(slots), self._prefill_group(prefilling, prefill_ranges))
        decoding = [e[0] for e in entries if not e[1]]
        groups = [list(range(len(decoding)))] if native_decode(self.kv[0][0]) and decoding \
            else decode_groups([s.num_tokens for s in decoding])
        meta.decode = [self._decode_group([decoding[i] for i in g], [decode_idx[i] for i in g]) for g in groups]
        return StepBatch([e[0] for e in entries], [e[1] for e in entries], self._tensor(ids),
                         self._tensor(positions), meta, self._tensor(last), segments)

    def _write_rows(self, slots: list[int]) -> torch.Tensor:
        """Cache rows ``[T * KVH]`` of each token's K/V heads (see AttentionMetadata.write_rows)."""
        bs, kvh = self.blocks.block_size, self.kv[0][0].shape[1]
        slot = torch.tensor(slots, dtype=torch.int64).unsqueeze(1)  # [T, 1]
        rows = ((slot // bs) * kvh + torch.arange(kvh)) * bs + slot % bs  # [T, KVH]
        return rows.flatten().to(self.device)

    def _tables(self, seqs: list[Sequence]) -> torch.Tensor:
        """The block tables ``[B, W]`` of these sequences' contexts (padding 0)."""
        width = max(self.blocks.blocks_needed(s.num_tokens) for s in seqs)
        tables = torch.zeros(len(seqs), width, dtype=torch.int64)
        for i, s in enumerate(seqs):
            table = self.blocks.tables[s.request_id][:width]
            tables[i, :len(table)] = torch.tensor(table)
        return tables.to(self.device)

    def _prefill_group(self, seqs: list[Sequence], ranges: list[tuple[int, int]]) -> PrefillGroup | None:
        """The prefilling sequences' token ranges, lengths and block tables (see PrefillGroup)."""
        if not seqs:
            return None
        return PrefillGroup(ranges, self._tensor([start for start, _ in ranges]),
                            self._tensor([end - start for start, end in ranges]), self._tables(seqs))

    def _decode_group(self, seqs: list[Sequence], decode_idx: list[int]) -> DecodeGroup:
        """The block tables ``[B, W]`` and context lengths ``[B]`` of these decoding sequences (see DecodeGroup)."""
        lengths = torch.tensor([s.num_tokens for s in seqs])
        return DecodeGroup(self._tensor(decode_idx), self._tables(seqs), lengths.to(self.device),
                           self.kv[0][0].shape[1], self.blocks.block_size)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Float32 logits ``[N, vocab]`` for each sequence's next token."""
        if self.graphs is not None and self.graphs.fits(batch):
            self.weight_lists.clear()  # hold no adapter's weights past the eager steps that use them
            return self.graphs.run(batch, padded=self.backend == "bgmv")
        lora = None
        if batch.segments:
            lora = LoraStep(batch.segments, self.lora_op, self.model.dtype, self.device, self.residency.deltas(),
                            self.weight_lists)
        else:
            self.weight_lists.clear()
        with torch.inference_mode():
            hidden = self.model.forward(batch.input_ids, batch.positions, batch.meta, self.kv, lora)
            return self.model.logits(hidden[batch.last_index])

    def run(self, plan: StepPlan) -> StepResult:
        """Run a step: the sequences (in batch order), their sampled tokens and logits, and which fell back."""
        batch = self.build(plan)
        logits = self.forward(batch).cpu()
        tokens = sample(logits, [s.params for s in batch.seqs], [s.generator for s in batch.seqs])
        fell_back = {seg.external.request_id: seg.external.failed for seg in batch.segments
                     if seg.external is not None and seg.external.failed is not None}
        return StepResult(batch.seqs, tokens, logits, fell_back)
