"""The flattened token batch of one step, as the runner builds it and the model runs it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.gpu_worker.attention import AttentionMetadata
from services.gpu_worker.lora_plan import LoraSegment
from services.gpu_worker.sequence import Sequence


@dataclass
class StepBatch:
    """The flattened token batch of one step (sequences ordered by adapter)."""

    seqs: list[Sequence]
    is_prefill: list[bool]
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    last_index: torch.Tensor  # [N] the token whose logits sample each sequence's next token
    segments: list[LoraSegment]  # one per request; adjacent requests of one resident adapter share one

    @property
    def decode_only(self) -> bool:
        """Every sequence decodes one token (then token i is sequence i's)."""
        return not any(self.is_prefill)
