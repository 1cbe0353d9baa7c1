"""The engine's one seam to adapter residency: :class:`AdapterResidency`.

The engine, admission, the runner, the worker service and the adapter admin talk to
adapters only through this protocol. It has one implementation,
:class:`~services.gpu_worker.residency.tiered.TieredResidency`, built by
:func:`~services.gpu_worker.residency.factory.make_residency`; the cold-start mode is a
strategy inside it. Every method is required.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from services.gpu_worker.lora_plan import ExternalDeltas, ExternalSource
from services.gpu_worker.residency.cold_start import Admit
from services.gpu_worker.residency.loader import LoadListener
from services.gpu_worker.residency.report import AssistReport, ResidencyReport
from shared.adapter_registry import AdapterRecord
from shared.peft_adapter import LoraAdapter
from shared.schemas.adapters import AdapterInfo


class UnknownAdapterError(KeyError):
    """No adapter of that name is registered."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown adapter '{self.name}'"


class AdapterResidency(Protocol):
    """Which adapters the engine serves, where their weights are, and what a cold request does."""

    # ---- requests (step loop) ----
    def rank(self, name: str) -> int:
        """The adapter's (max) rank; raises UnknownAdapterError."""

    def prefetch(self, name: str) -> None:
        """A request for ``name`` entered the engine (count hit or miss, start a load on a miss)."""

    def admit(self, name: str, tokens: int, assist: bool = True) -> Admit:
        """DEVICE, ASSISTED or WAIT for a request of ``tokens`` tokens this step."""

    def acquire(self, request_id: str, name: str, verdict: Admit) -> None:
        """A request starts running with the verdict :meth:`admit` gave (pins against eviction)."""

    def release(self, request_id: str, name: str) -> None:
        """A request stopped running (closes its external source, if any)."""

    def failure(self, name: str) -> str | None:
        """Why requests waiting for ``name`` can never run, or None."""

    def device_adapter(self, name: str) -> LoraAdapter | None:
        """The device-resident weights (possibly only some layers), or None."""

    def external(self, request_id: str, name: str) -> ExternalSource | None:
        """The request's externally computed deltas this step, or None."""

    def deltas(self) -> ExternalDeltas | None:
        """What computes external deltas (None when the mode has none)."""

    # ---- loads (step loop) ----
    def poll(self) -> None:
        """Publish landed layer groups and start the loads that fit; called once per engine step."""

    def loads_in_flight(self) -> int:
        """Loads submitted and not yet fully landed (an idle step loop waits on them)."""

    def pending_loads(self) -> int:
        """Loads in flight plus loads waiting for device space."""

    def wait_for_progress(self, timeout: float) -> bool:
        """Block until a load makes progress or ``timeout`` passes."""

    def demote(self, name: str, level: str) -> None:
        """Move ``name`` off the device to ``host`` or ``disk`` (cold-start profiling)."""

    def add_load_listener(self, listener: LoadListener) -> None:
        """Call ``listener(name, transition, seconds)`` for each finished load: ``load`` (disk to
        host memory, when it read the disk) and ``activate`` (host memory to device)."""

    # ---- administration and visibility (any thread) ----
    def register(self, name: str, path: str | Path, pinned: bool = False, owner: str | None = None
                 ) -> AdapterRecord:
        """Register ``name`` at ``path``; RegistryError / AdapterError on bad input."""

    def unregister(self, name: str) -> AdapterRecord:
        """Unload ``name``; AdapterNotFoundError if unknown."""

    def names(self) -> list[str]:
        """Registered adapter names."""

    def adapter_infos(self) -> list[AdapterInfo]:
        """Every registered adapter with its tier."""

    def report(self) -> ResidencyReport:
        """Tiers, budgets, counters and the CPU pool."""

    def assist_report(self) -> AssistReport:
        """CPU-assisted prefill alone (cheap: for every worker state)."""

    def close(self) -> None:
        """Stop loads and release shared memory."""
