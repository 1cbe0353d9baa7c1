"""The per-step LoRA plan: which adapter applies to which tokens, and where each delta comes from.

The runner orders a step's tokens so that each request's tokens are contiguous and
requests of the same adapter are adjacent. A :class:`LoraSegment` covers one request.
For every (segment, layer, projection) the plan decides the delta's source:

* **device**: the adapter's weights for that layer and projection are resident, so the
  batched backend op (BGMV or MBGMV) computes it with every other device segment;
* **external**: the weights are not resident (a cold adapter still loading) and the
  segment carries a :class:`DeltaSource` (CPU-assisted prefill) that supplies
  ``x @ A @ B`` for that layer and projection;
* **none**: the adapter does not target that projection, or the request has no adapter.

There is one model implementation: the model calls :meth:`LoraStep.begin` before a base
projection (so an external source can start computing while the base GEMM runs) and
:meth:`LoraStep.apply` after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from services.gpu_worker.lora_ops import LoraBatch
from shared.peft_adapter import LoraAdapter


class DeltaSource(Protocol):
    """Supplies LoRA deltas for one segment from outside the device path."""

    def start(self, layer: int, proj: str, x: torch.Tensor) -> None:
        """Begin computing ``x @ A @ B`` for ``x: [n, in]`` (may return before it is done)."""

    def finish(self, layer: int, proj: str) -> torch.Tensor:
        """The delta ``[n, out]`` for the matching :meth:`start`."""


@dataclass
class LoraSegment:
    """Tokens ``[start, end)`` of one request and the sources of their deltas."""

    start: int
    end: int
    adapter: LoraAdapter | None  # device-resident weights (possibly only some layers)
    external: DeltaSource | None = None


_EMPTY: dict[torch.dtype, torch.Tensor] = {}


def _empty(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, device)
    if key not in _EMPTY:
        _EMPTY[key] = torch.empty(0, 0, dtype=dtype, device=device)
    return _EMPTY[key]


class LoraStep:
    """Applies a step's LoRA plan inside the model forward."""

    def __init__(self, segments: list[LoraSegment], op: Callable[[torch.Tensor, torch.Tensor, LoraBatch], None],
                 dtype: torch.dtype, device: torch.device) -> None:
        self.segments = [s for s in segments if s.adapter is not None or s.external is not None]
        self.op = op
        self.empty = _empty(dtype, device)
        self.adapters: list[LoraAdapter] = []
        index: dict[int, int] = {}
        rows = []
        for seg in self.segments:
            if seg.adapter is None:
                continue
            u = index.setdefault(id(seg.adapter), len(self.adapters))
            if u == len(self.adapters):
                self.adapters.append(seg.adapter)
            rows.append((seg.start, seg.end, u))
        self._rows = rows
        self._all_device = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)

    def _source(self, seg: LoraSegment, layer: int, proj: str) -> str:
        if seg.adapter is not None and (layer, proj) in seg.adapter.weights:
            return "device"
        if seg.external is not None and self._targets(seg, layer, proj):
            return "external"
        return "none"

    @staticmethod
    def _targets(seg: LoraSegment, layer: int, proj: str) -> bool:
        targets = getattr(seg.external, "targets", None)
        return targets is None or (layer, proj) in targets

    def sources(self, layer: int, proj: str) -> list[str]:
        """The source of each segment's delta for ``(layer, proj)`` (for inspection and tests)."""
        return [self._source(seg, layer, proj) for seg in self.segments]

    def begin(self, layer: int, projs: tuple[str, ...], x: torch.Tensor) -> None:
        """Hand ``x`` to external sources of these projections before the base GEMM."""
        for seg in self.segments:
            if seg.external is None:
                continue
            for proj in projs:
                if self._source(seg, layer, proj) == "external":
                    seg.external.start(layer, proj, x[seg.start:seg.end])

    def apply(self, layer: int, proj: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """``y += lora(x)`` for every segment: ``x: [T, in]``, ``y: [T, out]`` (in place)."""
        if self._rows:
            self.op(y, x, self._device_batch(layer, proj))
        for seg in self.segments:
            if seg.external is not None and self._source(seg, layer, proj) == "external":
                y[seg.start:seg.end] += seg.external.finish(layer, proj).to(y.dtype)

    def _device_batch(self, layer: int, proj: str) -> LoraBatch:
        A, B = [], []
        for ad in self.adapters:
            pair = ad.weights.get((layer, proj))
            A.append(pair[0] if pair is not None else self.empty)
            B.append(pair[1] if pair is not None else self.empty)
        return LoraBatch(self._all_device, A, B)
