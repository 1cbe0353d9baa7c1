"""Cold-start strategies: what a request whose adapter is not on the device does.

Admission asks the strategy :meth:`ColdStart.admit` for each waiting request whose adapter
is not fully resident, and gets:

* ``WAIT``: skip it this step; its load is queued (S-LoRA's behaviour);
* ``ASSISTED``: run it now; the layers not resident yet get their deltas from the CPU
  prefill pool (an :class:`~services.gpu_worker.lora_plan.ExternalSource`).

(A fully resident adapter is ``DEVICE`` before any strategy is asked.) The strategy owns the
lifetime of each assisted request's external source: :meth:`open` creates it when the
request is admitted, :meth:`source` hands it to each step until every layer is resident
(then closes it: the request has joined the device path), and :meth:`close` ends it when
the request stops running.

Three strategies: :class:`Cached` (every adapter preloaded, never evicted: the ideal),
:class:`OnDemand` (wait for the load) and ``CpuAssist`` (``cpu_assist.py``).
"""

from __future__ import annotations

from enum import Enum
from typing import Protocol

from services.gpu_worker.lora_plan import ExternalDeltas, ExternalSource
from services.gpu_worker.residency.device_cache import CacheEntry
from services.gpu_worker.residency.report import AssistReport


class Admit(Enum):
    """Admission's verdict for a request's adapter this step."""

    DEVICE = "device"
    ASSISTED = "assisted"
    WAIT = "wait"


class ColdStart(Protocol):
    """A cold-start mode: ``cached``, ``on_demand`` or ``cpu_assist``."""

    mode: str
    preloads: bool  # every known adapter is loaded at start and never evicted (unbounded budget)

    def admit(self, name: str, tokens: int, entry: CacheEntry | None) -> Admit:
        """``ASSISTED`` or ``WAIT`` for a request of ``tokens`` tokens whose adapter ``name`` is not
        usable on the device; ``entry`` is its device-cache entry (a load in flight) or None."""

    def open(self, request_id: str, name: str) -> None:
        """Create the external source of a request just admitted ``ASSISTED``."""

    def source(self, request_id: str, entry: CacheEntry | None) -> ExternalSource | None:
        """The request's external source for this step, or None (none open, or every layer of
        ``entry`` is resident now: the source is closed and the request is on the device path)."""

    def close(self, request_id: str) -> None:
        """The request stopped running (finished, preempted, failed): release its source."""

    def deltas(self) -> ExternalDeltas | None:
        """What computes the external sources' deltas (None when the mode has none)."""

    def report(self) -> AssistReport:
        """Assisted prefills, fallbacks, CPU-computed layers and the pool's size and health."""

    def shutdown(self) -> None:
        """Release shared resources (rings, segments)."""


class _DeviceOnly:
    """A strategy with no external sources: a cold request waits for its load."""

    mode = ""
    preloads = False

    def admit(self, name: str, tokens: int, entry: CacheEntry | None) -> Admit:
        return Admit.WAIT

    def open(self, request_id: str, name: str) -> None:
        raise RuntimeError(f"{self.mode} mode never admits a request ASSISTED")

    def source(self, request_id: str, entry: CacheEntry | None) -> ExternalSource | None:
        return None

    def close(self, request_id: str) -> None:
        return None

    def deltas(self) -> ExternalDeltas | None:
        return None

    def report(self) -> AssistReport:
        return AssistReport()

    def shutdown(self) -> None:
        return None


class Cached(_DeviceOnly):
    """Every adapter known at start-up is preloaded onto the device and never evicted (the ideal)."""

    mode = "cached"
    preloads = True


class OnDemand(_DeviceOnly):
    """A request waits for its adapter's load before its prefill (as S-LoRA does)."""

    mode = "on_demand"
