"""Which adapters the engine can serve and where their weights are.

The engine talks to adapters only through :class:`AdapterManager`: it asks whether a
name is known and its rank, whether its weights are on the device (``ready``), for
the device copy of the weights, and for a :class:`DeltaSource` that fills in the layers
not yet resident (the CPU-assisted path). It marks adapters in use while requests run so a cache
never evicts them. :class:`StaticAdapters` is the simplest manager: every adapter is
loaded onto the device at start-up (the CACHED mode).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch

from services.gpu_worker.lora_plan import DeltaSource
from shared.llama_shape import LlamaShape
from shared.peft_adapter import LoraAdapter, load_adapter

log = logging.getLogger(__name__)


class UnknownAdapterError(KeyError):
    """No adapter of that name is registered."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown adapter '{self.name}'"


class AdapterManager(Protocol):
    def rank(self, name: str) -> int:
        """The adapter's (max) rank; raises UnknownAdapterError."""

    def ready(self, name: str) -> bool:
        """Are all its weights resident on the device?"""

    def device_adapter(self, name: str) -> LoraAdapter | None:
        """The device-resident weights (possibly only some layers), or None."""

    def delta_source(self, name: str) -> "DeltaSource | None":
        """Where deltas of non-resident layers come from this step (CPU-assisted prefill), or None."""

    def acquire(self, name: str) -> None:
        """A request of this adapter starts running (pins it against eviction)."""

    def release(self, name: str) -> None:
        """A request of this adapter stopped running."""

    def poll(self) -> None:
        """Advance asynchronous work (loads); called once per engine step."""

    def names(self) -> list[str]:
        """Registered adapter names."""


class StaticAdapters:
    """All adapters loaded onto the device at start-up; nothing is ever evicted."""

    def __init__(self, paths: dict[str, str | Path], shape: LlamaShape, max_rank: int, dtype: torch.dtype,
                 device: str, base_model: str | None = None) -> None:
        self._adapters: dict[str, LoraAdapter] = {}
        for name, path in paths.items():
            self._adapters[name] = load_adapter(name, path, shape, max_rank, base_model).to(device, dtype)
            log.info("adapter %s loaded: rank %d, %d modules", name, self._adapters[name].rank,
                     len(self._adapters[name].weights))

    def _get(self, name: str) -> LoraAdapter:
        try:
            return self._adapters[name]
        except KeyError:
            raise UnknownAdapterError(name) from None

    def rank(self, name: str) -> int:
        return self._get(name).rank

    def ready(self, name: str) -> bool:
        return name in self._adapters

    def device_adapter(self, name: str) -> LoraAdapter | None:
        return self._adapters.get(name)

    def delta_source(self, name: str) -> None:
        return None

    def acquire(self, name: str) -> None:
        self._get(name)

    def release(self, name: str) -> None:
        return None

    def poll(self) -> None:
        return None

    def names(self) -> list[str]:
        return list(self._adapters)
