"""Adapters in host memory, within a byte budget.

:meth:`HostStore.get` returns an adapter's kernel-ready weights in the serving dtype on
the host (page-locked where CUDA exists, so device copies can be asynchronous), reading
and validating the PEFT directory on a miss. Past the budget the least recently used
adapters are dropped back to disk-only. An adapter larger than the whole budget is
still returned, just not kept. Thread-safe: the loader thread reads through it while
the step loop drops unloaded adapters.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import torch

from shared.adapter_registry import AdapterRecord
from shared.llama_shape import LlamaShape
from shared.peft_adapter import LoraAdapter, load_adapter

log = logging.getLogger(__name__)


def to_host(adapter: LoraAdapter, dtype: torch.dtype, pin: bool) -> LoraAdapter:
    """A host copy of ``adapter`` in ``dtype``, page-locked when ``pin``."""
    def place(t: torch.Tensor) -> torch.Tensor:
        t = t.to("cpu", dtype).contiguous()
        return t.pin_memory() if pin else t

    weights = {k: (place(a), place(b)) for k, (a, b) in adapter.weights.items()}
    return LoraAdapter(adapter.name, adapter.path, weights, adapter.base_model, adapter.use_rslora,
                       adapter.target_projections, adapter.config)


class HostStore:
    """Host-memory tier of adapter residency, LRU within ``budget_bytes``."""

    def __init__(self, budget_bytes: int, shape: LlamaShape, max_rank: int, dtype: torch.dtype, pin: bool,
                 base_model: str | None = None) -> None:
        self.budget_bytes, self.shape, self.max_rank = budget_bytes, shape, max_rank
        self.dtype, self.pin, self.base_model = dtype, pin, base_model
        self._adapters: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.used_bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._lock = threading.Lock()

    def get(self, record: AdapterRecord) -> LoraAdapter:
        """The host copy of ``record``'s adapter, read from disk on a miss (raises AdapterError)."""
        with self._lock:
            adapter = self._adapters.get(record.name)
            if adapter is not None and adapter.path == record.path:
                self._adapters.move_to_end(record.name)
                self.hits += 1
                return adapter
            self.misses += 1
        adapter = to_host(load_adapter(record.name, record.path, self.shape, self.max_rank, self.base_model),
                          self.dtype, self.pin)
        self._keep(adapter)
        return adapter

    def _keep(self, adapter: LoraAdapter) -> None:
        with self._lock:
            self._pop(adapter.name)
            if adapter.nbytes > self.budget_bytes:
                log.info("adapter %s (%d bytes) exceeds the host budget; not kept in host memory",
                         adapter.name, adapter.nbytes)
                return
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
