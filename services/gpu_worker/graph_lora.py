"""The LoRA metadata of a captured decode step, held in static device buffers (see decode_graph.py).

A CUDA graph replays kernels with the arguments they were captured with, so everything that
changes from step to step must be data in buffers whose addresses never change. The Triton
kernels of triton_lora.py already read the adapters through a pointer table, so the buffers are:

* ``segs: [S, 3]`` int64 rows ``(start, end, u)``; rows past the step's segments are ``(0, 0, 0)``,
  empty, and their programs exit at once;
* ``adapters: [L, P, S, 3]`` int64: for layer l, projection p (PROJECTIONS order) and adapter u,
  ``(A address, B address, rank)``, rank 0 where the adapter has no weights there;
* ``v: [S, R]`` float32, the shrink output, ``R`` = the engine's ``max_lora_rank``.

``S`` is the largest captured batch (a decode step has at most one segment per token). Each
step's :meth:`StaticLoraTables.fill` builds the rows on the host and copies them in. The kernel
grids are sized by the captured batch size, so BGMV pads every adapter to ``max_lora_rank``
(not to the batch's largest rank, as the eager path does): the same result, at the cost vLLM's
captured LoRA path pays too.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from services.gpu_worker import triton_lora
from services.gpu_worker.lora_plan import LoraSegment, device_rows
from shared.llama_shape import INPUT_GROUPS, PROJECTIONS
from shared.peft_adapter import LoraAdapter

PROJ_INDEX = {proj: i for i, proj in enumerate(PROJECTIONS)}


def adapter_rows(adapter: LoraAdapter, num_layers: int, dtype: torch.dtype) -> torch.Tensor:
    """``[L, P, 3]`` int64: ``(A address, B address, rank)`` of each (layer, projection) the adapter
    has device weights for, zeros elsewhere; the weights must be contiguous and in ``dtype``."""
    rows = torch.zeros(num_layers, len(PROJECTIONS), 3, dtype=torch.int64)
    for (layer, proj), (a, b) in adapter.weights.items():
        if not (a.is_contiguous() and b.is_contiguous() and a.dtype == b.dtype == dtype):
            raise ValueError(f"adapter {adapter.name} ({layer}, {proj}): the kernels read contiguous {dtype} weights")
        rows[layer, PROJ_INDEX[proj]] = torch.tensor([a.data_ptr(), b.data_ptr(), a.shape[1]])
    return rows


class StaticLoraTables:
    """The buffers above, for batches of up to ``max_tokens`` decode tokens."""

    def __init__(self, num_layers: int, max_tokens: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.num_layers, self.dtype = num_layers, dtype
        self.segs = torch.zeros(max_tokens, 3, dtype=torch.int64, device=device)
        self.adapters = torch.zeros(num_layers, len(PROJECTIONS), max_tokens, 3, dtype=torch.int64, device=device)
        self.v = torch.zeros(max_tokens, max_rank, dtype=torch.float32, device=device)
        self._rows: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}  # id -> (adapter, #weights, rows)

    def fill(self, segments: list[LoraSegment]) -> None:
        """Write a step's segments (each of one device-resident adapter, no external source) and
        their adapters' pointer rows. The adapters' weights must stay alive until the step ran."""
        rows, adapters = device_rows(segments)
        segs = torch.zeros(self.segs.shape, dtype=torch.int64)
        segs[:len(rows)] = torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)
        self.segs.copy_(segs)
        if adapters:
            pointers = torch.stack([self._adapter_rows(a) for a in adapters], dim=2)  # [L, P, U, 3]
            self.adapters[:, :, :len(adapters)].copy_(pointers)

    def _adapter_rows(self, adapter: LoraAdapter) -> torch.Tensor:
        """:func:`adapter_rows`, cached while the adapter lives and its resident layers stay the same
        (they only grow while it loads, so the count of its weights tells)."""
        cached = self._rows.get(id(adapter))
        if cached is None or cached[0]() is not adapter or cached[1] != len(adapter.weights):
            key = id(adapter)
            forget = weakref.ref(adapter, lambda _: self._rows.pop(key, None))  # an evicted adapter's rows go
            cached = (forget, len(adapter.weights), adapter_rows(adapter, self.num_layers, self.dtype))
            self._rows[key] = cached
        return cached[2]

    @property
    def cached_adapters(self) -> int:
        """How many adapters' pointer rows are cached (an adapter that is gone drops its own)."""
        return len(self._rows)

    def hooks(self, size: int, padded: bool) -> "StaticLora":
        """The model's LoRA hooks for a captured step of ``size`` tokens (``padded``: BGMV)."""
        return StaticLora(self, size, padded)


@dataclass
class StaticLora:
    """:class:`~services.gpu_worker.lora_plan.LoraHooks` over the static tables: a captured step has
    no external deltas, so :meth:`begin` has nothing to hand over."""

    tables: StaticLoraTables
    size: int
    padded: bool

    def begin(self, layer: int, group: str, x: torch.Tensor) -> None:
        """Nothing: every delta of a captured step comes from the device."""

    def apply(self, layer: int, group: str, x: torch.Tensor, ys: tuple[torch.Tensor, ...]) -> None:
        """``y += lora(x)`` for each projection of the group (``x: [size, in]``, ``y: [size, out]``)."""
        segs, v = self.tables.segs[:self.size], self.tables.v[:self.size]
        for proj, y in zip(INPUT_GROUPS[group], ys):
            adapters = self.tables.adapters[layer, PROJ_INDEX[proj]]
            triton_lora.shrink(v, x, segs, adapters, self.size, self.padded)
            triton_lora.expand(y, v, segs, adapters, self.size, self.padded)
