"""The per-step LoRA plan: which adapter applies to which tokens, and where each delta comes from.

The runner orders a step's tokens so that each request's tokens are contiguous and
requests of the same adapter are adjacent. A :class:`LoraSegment` covers one request (or
adjacent requests of one resident adapter). For every (segment, layer, projection) the
plan decides the delta's source:

* **device**: the adapter's weights for that layer and projection are resident, so the
  batched backend op (BGMV or MBGMV) computes it with every other device segment;
* **external**: the weights are not resident yet (a cold adapter still loading), the
  segment carries an :class:`ExternalSource` whose declared ``targets`` include that
  (layer, projection), and the step's :class:`ExternalDeltas` (the CPU prefill pool)
  supplies ``x @ A @ B``;
* **none**: the adapter does not target that projection, or the request has no adapter.

The model calls :meth:`LoraStep.begin` once per (layer, input group) before the group's
base GEMM, so the external deltas of every cold segment are computed while the GEMM runs,
and :meth:`LoraStep.apply` after it. Input groups share one input: q/k/v, gate/up, o, down.
There is one model implementation and one external call per (layer, group) per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from services.gpu_worker.lora_ops import LoraBatch, max_rank
from shared.peft_adapter import LoraAdapter
from shared.llama_shape import INPUT_GROUPS


@dataclass
class ExternalSource:
    """One request's deltas from outside the device path (a slot of the CPU prefill ring).

    ``targets``: the (layer, projection) pairs the adapter has weights for. ``failed`` is set
    (with the reason) when a delta did not arrive by its deadline; the step's result for
    this request is then discarded and it waits for its load instead.
    """

    request_id: str
    slot: int
    adapter_id: int
    targets: frozenset[tuple[int, str]]
    failed: str | None = None


@dataclass(frozen=True)
class ColdPart:
    """Tokens ``[start, end)`` of ``source`` whose deltas for ``projs`` of this (layer, group) are external."""

    start: int
    end: int
    source: ExternalSource
    projs: tuple[str, ...]


class ExternalDeltas(Protocol):
    """Computes the deltas of every cold segment of a step, one call pair per (layer, input group)."""

    def start(self, layer: int, group: str, x: torch.Tensor, parts: list[ColdPart]) -> None:
        """Hand ``x[part.start:part.end]`` (``x: [T, in]``) of every part over; returns at once."""

    def finish(self, layer: int, group: str, ys: dict[str, torch.Tensor], parts: list[ColdPart]) -> None:
        """``ys[proj][part.start:part.end] += delta`` for every part and proj of the matching
        :meth:`start` (``ys[proj]: [T, out]``), waiting at most until the source's deadline; a part
        whose deltas are late gets ``source.failed`` set and is left untouched."""


class LoraHooks(Protocol):
    """What the model calls around each (layer, input group)'s base GEMM: :class:`LoraStep` in an
    eager step, the static tables' hooks in a captured decode step (graph_lora.py)."""

    def begin(self, layer: int, group: str, x: torch.Tensor) -> None:
        """Before the group's GEMM, with its input ``x: [T, in]``."""

    def apply(self, layer: int, group: str, x: torch.Tensor, ys: tuple[torch.Tensor, ...]) -> None:
        """After it: ``y += lora(x)`` in place for each projection's output ``y: [T, out]`` in ``ys``
        (INPUT_GROUPS order)."""


@dataclass
class LoraSegment:
    """Tokens ``[start, end)`` of one request and the sources of their deltas."""

    start: int
    end: int
    adapter: LoraAdapter | None  # device-resident weights (possibly only some layers)
    external: ExternalSource | None = None


def device_rows(segments: list[LoraSegment]) -> tuple[list[tuple[int, int, int]], list[LoraAdapter]]:
    """``(start, end, u)`` of every segment with device weights, ``u`` indexing the distinct adapters
    in first-seen order, and those adapters: the segment table the batched ops take."""
    adapters: list[LoraAdapter] = []
    index: dict[int, int] = {}
    rows = []
    for seg in segments:
        if seg.adapter is None:
            continue
        u = index.setdefault(id(seg.adapter), len(adapters))
        if u == len(adapters):
            adapters.append(seg.adapter)
        rows.append((seg.start, seg.end, u))
    return rows, adapters


_EMPTY: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _empty(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (dtype, device)
    if key not in _EMPTY:
        _EMPTY[key] = torch.empty(0, 0, dtype=dtype, device=device)
    return _EMPTY[key]


WeightList = tuple[list[torch.Tensor], list[torch.Tensor], int]
"""One (layer, projection)'s ``A`` list, ``B`` list and max rank, in the step's adapter order."""


class WeightLists:
    """The ``A`` and ``B`` lists the batched op takes for each (layer, projection), and their max
    rank, kept from step to step while the steps' adapters, and the layers each has landed, stay
    the same: a run of decode steps builds them once instead of once per step (210 lists of every
    adapter's weights a step for a 30-layer model). Holds the adapters it keys on, so their ids
    stay theirs."""

    def __init__(self) -> None:
        self._adapters: list[LoraAdapter] = []
        self._key: tuple[tuple[int, int], ...] = ()
        self._lists: dict[tuple[int, str], WeightList] = {}

    def clear(self) -> None:
        """Forget the lists and the adapters (a step without eager LoRA: nothing to keep alive for)."""
        self._adapters, self._key, self._lists = [], (), {}

    def for_adapters(self, adapters: list[LoraAdapter]) -> dict[tuple[int, str], WeightList]:
        """The (possibly still empty) lists by (layer, projection) for this adapter order."""
        key = tuple((id(ad), len(ad.weights)) for ad in adapters)
        if key != self._key:
            self._adapters, self._key, self._lists = list(adapters), key, {}
        return self._lists


@dataclass
class LoraStep:
    """Applies a step's LoRA plan inside the model forward."""

    segments: list[LoraSegment]
    op: Callable[[torch.Tensor, torch.Tensor, LoraBatch], None]
    dtype: torch.dtype
    device: torch.device
    deltas: ExternalDeltas | None = None
    weight_lists: WeightLists = field(default_factory=WeightLists)
    adapters: list[LoraAdapter] = field(init=False)

    def __post_init__(self) -> None:
        self.segments = [s for s in self.segments if s.adapter is not None or s.external is not None]
        self.empty = _empty(self.dtype, self.device)
        rows, self.adapters = device_rows(self.segments)
        self._lists = self.weight_lists.for_adapters(self.adapters)
        self._has_device = bool(rows)
        self._all_device = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)
        self._cold: dict[tuple[int, str], list[ColdPart]] = {}

    @staticmethod
    def source(seg: LoraSegment, layer: int, proj: str) -> str:
        """``device``, ``external`` or ``none`` for ``seg``'s delta of ``(layer, proj)``."""
        if seg.adapter is not None and (layer, proj) in seg.adapter.weights:
            return "device"
        if seg.external is not None and seg.external.failed is None and (layer, proj) in seg.external.targets:
            return "external"
        return "none"

    def sources(self, layer: int, proj: str) -> list[str]:
        """The source of each segment's delta for ``(layer, proj)`` (for inspection and tests)."""
        return [self.source(seg, layer, proj) for seg in self.segments]

    def _cold_parts(self, layer: int, group: str) -> list[ColdPart]:
        parts = []
        for seg in self.segments:
            if seg.external is None:
                continue
            projs = tuple(p for p in INPUT_GROUPS[group] if self.source(seg, layer, p) == "external")
            if projs:
                parts.append(ColdPart(seg.start, seg.end, seg.external, projs))
        return parts

    def begin(self, layer: int, group: str, x: torch.Tensor) -> None:
        """Hand ``x: [T, in]`` to the external source of every cold segment, before the base GEMM."""
        parts = self._cold_parts(layer, group) if self.deltas is not None else []
        if parts:
            self.deltas.start(layer, group, x, parts)
            self._cold[(layer, group)] = parts

    def apply(self, layer: int, group: str, x: torch.Tensor, ys: tuple[torch.Tensor, ...]) -> None:
        """``y += lora(x)`` for every segment and projection of ``group``: ``x: [T, in]``,
        ``ys``: one ``[T, out]`` output per projection of the group, in INPUT_GROUPS order (in place)."""
        by_proj = dict(zip(INPUT_GROUPS[group], ys))
        if self._has_device:
            for proj, y in by_proj.items():
                self.op(y, x, self._device_batch(layer, proj))
        parts = self._cold.pop((layer, group), None)
        if parts:
            self.deltas.finish(layer, group, by_proj, parts)

    def _device_batch(self, layer: int, proj: str) -> LoraBatch:
        lists = self._lists.get((layer, proj))
        if lists is None:
            A, B = [], []
            for ad in self.adapters:
                pair = ad.weights.get((layer, proj))
                A.append(pair[0] if pair is not None else self.empty)
                B.append(pair[1] if pair is not None else self.empty)
            lists = self._lists[(layer, proj)] = (A, B, max_rank(A))
        return LoraBatch(self._all_device, *lists)
