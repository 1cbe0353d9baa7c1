"""Adapters in host memory, within a byte budget.

:meth:`HostStore.get` returns an adapter's kernel-ready weights in the serving dtype on
the host (page-locked where CUDA exists, so device copies can be asynchronous), reading
and validating the PEFT directory on a miss. Past the budget the least recently used
adapters are dropped back to disk-only. An adapter larger than the whole budget is
still returned, just not kept. Thread-safe: the loader thread reads through it while
the step loop drops unloaded adapters.

With ``layout`` (the native CPU kernel's pair layouts, lora_ops.kernel_layout) a private host
copy is kept in that layout, so the CPU device tier shares it as it is (the EMULATED link).

With ``shared_prefix`` (cpu_assist mode) each host copy lives in one shared-memory
segment (:class:`~shared.shm_exchange.AdapterSegment`, numbered by a per-store adapter id)
that the CPU prefill pool maps: a cold request's CPU work reads the same bytes, with no
copy per request and no second read from disk. A dropped adapter's segment is unlinked.
Shared copies stay plain (the pool reads them so); the link lays out the device copy.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import torch

from services.gpu_worker.residency.link import Layout
from shared.adapter_registry import AdapterRecord
from shared.llama_shape import LlamaShape
from shared.peft_adapter import LoraAdapter, load_adapter
from shared.shm_exchange import AdapterSegment

log = logging.getLogger(__name__)


def to_host(adapter: LoraAdapter, dtype: torch.dtype, pin: bool, layout: Layout | None = None) -> LoraAdapter:
    """A host copy of ``adapter`` in ``dtype``, page-locked when ``pin``, in ``layout`` when given."""
    def place(t: torch.Tensor) -> torch.Tensor:
        t = t.to("cpu", dtype).contiguous()
        return t.pin_memory() if pin else t

    def lay_out(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return layout(a, b) if layout is not None else (a, b)

    return _with_weights(adapter, {k: lay_out(place(a), place(b)) for k, (a, b) in adapter.weights.items()})


def _with_weights(adapter: LoraAdapter, weights: dict) -> LoraAdapter:
    return LoraAdapter(adapter.name, adapter.path, weights, adapter.base_model, adapter.use_rslora,
                       adapter.target_projections, adapter.config)


class HostStore:
    """Host-memory tier of adapter residency, LRU within ``budget_bytes``."""

    def __init__(self, budget_bytes: int, shape: LlamaShape, max_rank: int, dtype: torch.dtype, pin: bool,
                 base_model: str | None = None, shared_prefix: str | None = None, layout: Layout | None = None) -> None:
        self.budget_bytes, self.shape, self.max_rank = budget_bytes, shape, max_rank
        self.dtype, self.pin, self.base_model = dtype, pin, base_model
        self.shared_prefix, self.layout = shared_prefix, layout
        self._adapters: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._segments: dict[str, AdapterSegment] = {}
        self._next_id = 1
        self.used_bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.Lock()

    def warm(self, record: AdapterRecord) -> bool:
        """Read ``record``'s adapter into host memory if it fits the budget without evicting
        another one (raises AdapterError); True when it is in host memory now."""
        with self._lock:
            if record.name in self._adapters:
                return True
            if self.used_bytes + record.nbytes > self.budget_bytes:
                return False
        self.get(record)
        return True

    def get(self, record: AdapterRecord) -> LoraAdapter:
        """The host copy of ``record``'s adapter, read from disk on a miss (raises AdapterError)."""
        with self._lock:
            adapter = self._adapters.get(record.name)
            if adapter is not None and adapter.path == record.path:
                self._adapters.move_to_end(record.name)
                self.hits += 1
                return adapter
            self.misses += 1
        loaded = load_adapter(record.name, record.path, self.shape, self.max_rank, self.base_model)
        if self.shared_prefix is None:
            adapter = to_host(loaded, self.dtype, self.pin, self.layout)
            self._keep(adapter)
            return adapter
        return self._keep_shared(loaded)

    def _keep_shared(self, loaded: LoraAdapter) -> LoraAdapter:
        """Copy ``loaded`` once into a new shared-memory segment and keep it (or not, past the budget)."""
        with self._lock:
            adapter_id, self._next_id = self._next_id, self._next_id + 1
        weights = {k: (a.to(self.dtype), b.to(self.dtype)) for k, (a, b) in loaded.weights.items()}
        segment = AdapterSegment.create(self.shared_prefix, adapter_id, weights, pin=self.pin)
        adapter = _with_weights(loaded, segment.weights)
        self._keep(adapter, segment)
        return adapter

    def shared(self, name: str) -> tuple[int, frozenset[tuple[int, str]]] | None:
        """``(adapter id, (layer, projection) targets)`` of ``name``'s shared host copy, or None."""
        with self._lock:
            segment, adapter = self._segments.get(name), self._adapters.get(name)
            if segment is None or adapter is None:
                return None
            return segment.adapter_id, frozenset(adapter.weights)

    def _keep(self, adapter: LoraAdapter, segment: AdapterSegment | None = None) -> None:
        with self._lock:
            self._pop(adapter.name)
            if segment is not None:
                self._segments[adapter.name] = segment
            if adapter.nbytes > self.budget_bytes:
                log.info("adapter %s (%d bytes) exceeds the host budget; not kept in host memory",
                         adapter.name, adapter.nbytes)
                return  # its segment (if any) stays until the name is dropped or the store closes
            while self.used_bytes + adapter.nbytes > self.budget_bytes:
                victim = next(iter(self._adapters))
                self._pop(victim)
                self.evictions += 1
                log.debug("host store: %s back to disk-only", victim)
            self._adapters[adapter.name] = adapter
            self.used_bytes += adapter.nbytes

    def _pop(self, name: str) -> None:
        old = self._adapters.pop(name, None)
        if old is not None:
            self.used_bytes -= old.nbytes
        segment = self._segments.pop(name, None)
        if segment is not None:
            segment.close()

    def close(self) -> None:
        """Drop every adapter (and unlink its segment)."""
        with self._lock:
            for name in list(self._adapters) + list(self._segments):
                self._pop(name)

    def contains(self, name: str) -> bool:
        with self._lock:
            return name in self._adapters

    def drop(self, name: str) -> None:
        """Forget ``name`` (it was unloaded)."""
        with self._lock:
            self._pop(name)

    def names(self) -> list[str]:
        """Adapters in host memory, least recently used first."""
        with self._lock:
            return list(self._adapters)
