"""The ``cpu_assist`` cold start: a cold request's prefill starts at once, its missing deltas from CPUs.

A request whose adapter is loading is admitted ``ASSISTED`` when the adapter's host copy is in
the host store's shared memory (the pool maps it; nothing is read from disk again), the CPU
prefill pool is healthy, a ring slot is free and the prompt fits a slot. Each step, the
request's :class:`~services.gpu_worker.lora_plan.ExternalSource` covers the layers not yet
resident; layers hand over to the device path (BGMV/MBGMV) from the step in which their group
lands. A request that finishes prefill before its adapter has landed keeps CPU deltas for the
missing layers while it decodes, and joins the batched device path once every layer is
resident (its source is closed then).

Anything else waits for the load, as ``on_demand`` does: an absent or unhealthy pool, no free
slot, a prompt longer than a slot, or an adapter only on disk (its host copy comes first: the
disk-level cold start).
"""

from __future__ import annotations

import logging
from typing import Callable

from services.gpu_worker.lora_plan import ExternalDeltas, ExternalSource
from services.gpu_worker.residency.assist_exchange import AssistExchange
from services.gpu_worker.residency.cold_start import Admit
from services.gpu_worker.residency.device_cache import CacheEntry
from services.gpu_worker.residency.host_store import HostStore
from services.gpu_worker.residency.pool_health import PoolHealth
from services.gpu_worker.residency.report import AssistReport

log = logging.getLogger(__name__)


def cpu_layers(source: ExternalSource, entry: CacheEntry | None) -> int:
    """Layers of ``source``'s targets that are not resident in ``entry`` (their deltas come from CPUs)."""
    resident = entry.adapter.weights if entry is not None else {}
    return len({layer for layer, proj in source.targets if (layer, proj) not in resident})


class CpuAssist:
    """Cold requests prefill with CPU-computed deltas while their adapter loads."""

    mode = "cpu_assist"
    preloads = False

    def __init__(self, exchange: AssistExchange, health: PoolHealth, host_store: HostStore,
                 release_cores: Callable[[], None]) -> None:
        self.exchange, self.health, self.host_store = exchange, health, host_store
        self.release_cores = release_cores
        self._free = list(range(exchange.ring.geometry.num_slots))
        self._open: dict[str, ExternalSource] = {}
        self.counts = AssistReport()

    def admit(self, name: str, tokens: int, entry: CacheEntry | None) -> Admit:
        if entry is None or entry.doomed or tokens > self.exchange.max_tokens:
            return Admit.WAIT
        if self._free_slot() is None or not self.health.healthy() or self.host_store.shared(name) is None:
            return Admit.WAIT
        return Admit.ASSISTED

    def _free_slot(self) -> int | None:
        return next((s for s in self._free if self.exchange.slot_free(s)), None)

    def open(self, request_id: str, name: str) -> None:
        slot, shared = self._free_slot(), self.host_store.shared(name)
        if slot is None or shared is None:
            raise RuntimeError(f"request {request_id} was admitted ASSISTED without a free slot or host copy")
        self._free.remove(slot)
        adapter_id, targets = shared
        self._open[request_id] = ExternalSource(request_id, slot, adapter_id, targets)
        self.counts.assisted += 1

    def source(self, request_id: str, entry: CacheEntry | None) -> ExternalSource | None:
        source = self._open.get(request_id)
        if source is None or source.failed is not None:
            return None
        layers = cpu_layers(source, entry)
        if layers == 0:
            self.close(request_id)  # handed over: every layer it needs is on the device
            return None
        self.counts.cpu_layers += layers
        return source

    def close(self, request_id: str) -> None:
        source = self._open.pop(request_id, None)
        if source is None:
            return
        if source.failed is not None:
            self.counts.fallbacks += 1
            log.warning("request %s fell back to waiting for its adapter: %s", request_id, source.failed)
        self._free.append(source.slot)

    def deltas(self) -> ExternalDeltas:
        return self.exchange

    def report(self) -> AssistReport:
        c, x = self.counts, self.exchange.stats
        return AssistReport(c.assisted, c.fallbacks, c.cpu_layers, self.exchange.workers, self.health.alive(),
                            self.health.healthy(), len(self._open), x.calls, x.layers, round(x.overhead_s * 1e3, 3),
                            x.late)

    def shutdown(self) -> None:
        self.exchange.ring.close()
        self.release_cores()
