"""Tiered adapter residency: disk -> host store -> device cache, the engine's AdapterResidency.

:class:`TieredResidency` combines the :class:`~shared.adapter_registry.AdapterRegistry`
(names, paths, the resolver), the :class:`HostStore`, the :class:`DeviceCache`, the
:class:`AdapterLoader` and a :class:`~services.gpu_worker.residency.cold_start.ColdStart`
strategy, which decides what a request whose adapter is not on the device does:

* ``cached``: every adapter known at start-up is queued for loading at once (served by the
  loader thread as the step loop polls; :meth:`pending_loads` says how many remain) and
  never evicted; the budget is unbounded (the ideal the paper measures against);
* ``on_demand``: the request's arrival (:meth:`prefetch`) queues a load; admission skips
  it until every layer is resident (as S-LoRA does), while running requests keep decoding;
* ``cpu_assist``: as soon as the load has started, the request runs with CPU-computed
  deltas for the layers not resident yet (:meth:`external`), handing each layer group over
  to the device path as it lands.

Loads that need device space start in FIFO order of first request: when the cache is
full of adapters in use, the queue head waits for a running request to finish, and no
later miss overtakes it. The step loop calls every method except :meth:`register`,
:meth:`unregister`, :meth:`report` and :meth:`adapter_infos`, which any thread may call.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections import deque
from dataclasses import replace
from pathlib import Path

import torch

from services.gpu_worker.lora_plan import ExternalDeltas, ExternalSource
from services.gpu_worker.residency.cold_start import Admit, ColdStart
from services.gpu_worker.residency.link import Layout, Link, make_link
from services.gpu_worker.residency.loader import AdapterLoader, Landed, LoadJob, LoadListener
from services.gpu_worker.residency.protocol import UnknownAdapterError
from services.gpu_worker.residency.device_cache import DeviceCache
from services.gpu_worker.residency.host_store import HostStore
from services.gpu_worker.residency.config import ResidencyConfig
from services.gpu_worker.residency.metrics import ResidencyCounters
from services.gpu_worker.residency.report import AdapterResidencyInfo, AssistReport, ResidencyReport
from shared.adapter_registry import AdapterNotFoundError, AdapterRecord, AdapterRegistry, RegistryError, check_name
from shared.llama_shape import LlamaShape
from shared.peft_adapter import AdapterError, LoraAdapter, validate_adapter
from shared.schemas.adapters import AdapterInfo
from shared.thread_limits import run_torch_serially

log = logging.getLogger(__name__)


class AdapterUnavailableError(UnknownAdapterError):
    """The adapter name exists on disk but cannot be served (bad path or unusable files)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def free_device_bytes(device: str) -> int:
    """Free memory on ``device``: the CUDA allocator's view, or available host RAM on CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def device_budget(config: ResidencyConfig, device: str, preloads: bool) -> int:
    """The device cache's byte budget: unbounded when every adapter is preloaded, else explicit or a
    share of free memory."""
    if preloads:
        return sys.maxsize
    if config.device_adapter_bytes:
        return config.device_adapter_bytes
    return int(free_device_bytes(device) * config.device_adapter_fraction)


class TieredResidency:
    """The AdapterResidency over the registry, host store, device cache, loader and a cold-start strategy."""

    def __init__(self, config: ResidencyConfig, shape: LlamaShape, max_rank: int, dtype: torch.dtype, device: str,
                 host_store: HostStore, cold_start: ColdStart, adapters: dict[str, str | Path] | None = None,
                 link: Link | None = None, owns_host_store: bool = True, layout: Layout | None = None) -> None:
        self.config, self.device, self.dtype = config, device, dtype
        self.shape, self.max_rank = shape, max_rank
        self.cold_start = cold_start
        self.registry = AdapterRegistry(config.adapter_dir or None, max_rank, torch.finfo(dtype).bits // 8, shape)
        for name, path in (adapters or {}).items():
            self.registry.add_trusted(name, path)
        self.host_store, self.owns_host_store = host_store, owns_host_store
        self.link = link or make_link(device, config.emulate_link_gbps, config.emulate_link_latency_ms, layout)
        self.cache = DeviceCache(device_budget(config, device, cold_start.preloads))
        self.loader = AdapterLoader(self.host_store, self.link, shape.num_layers, config.load_groups)
        self.counters = ResidencyCounters()
        self._pending: deque[str] = deque()  # loads waiting for device space, FIFO
        self._jobs: dict[str, LoadJob] = {}  # loads in flight
        self._failures: dict[str, str] = {}  # name -> why its last load failed
        self._commands: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._lock = threading.RLock()
        self._polls = 0
        self._asked: dict[str, int] = {}  # name -> poll count when a request last asked for it
        self._fresh: set[str] = set()  # loaded, kept from eviction until a request of it starts
        self._load_listeners: list[LoadListener] = []
        log.info("adapter residency: mode %s, device budget %s bytes, host budget %d bytes%s", config.cold_start,
                 "unbounded" if self.cache.budget_bytes == sys.maxsize else self.cache.budget_bytes,
                 config.host_adapter_bytes, ", EMULATED link" if self.link.emulated else "")
        # Every adapter in the root is known (at disk level) from the start, so workers
        # advertise it and the scheduler can route its requests in every mode.
        discovered = self.registry.discover()
        self._closing = threading.Event()
        self._warmer: threading.Thread | None = None
        if config.warm_host and not cold_start.preloads and discovered:
            self._warmer = threading.Thread(target=self._warm_host, args=(discovered,), name="host warmer",
                                            daemon=True)
            self._warmer.start()
        if cold_start.preloads:
            for record in self.registry.records():
                self._want(record.name)
            log.info("cached mode: %d adapters queued for preloading", len(self._pending))

    @staticmethod
    def _empty_adapter(record: AdapterRecord) -> LoraAdapter:
        return LoraAdapter(record.name, record.path, {}, target_projections=record.target_modules)

    # ---- registration (any thread) -----------------------------------------------------
    def register(self, name: str, path: str | Path, pinned: bool = False, owner: str | None = None) -> AdapterRecord:
        """Register an adapter inside the adapter root (RegistryError / AdapterError on bad input).

        A new adapter's files are checked in full first (shapes against the base model,
        every weight finite), so a bad one is refused here rather than at its first request.
        Pinned adapters (and every adapter in cached mode) start loading at once; with
        ``warm_host``, the others are copied into host memory while its budget has room, so
        their cold starts begin in host memory (the paper's setting). The adapter root's
        adapters are copied the same way at start, on a background thread.
        """
        check_name(name)
        folder = self.registry.safe_path(path)
        if self.registry.lookup(name) is None:
            validate_adapter(name, folder, self.shape, self.max_rank)
        record = self.registry.register(name, folder, owner, pinned)
        if self.config.warm_host and not (pinned or self.cold_start.preloads):
            self.host_store.warm(record)
        self._commands.put(("register", name))
        return record

    def unregister(self, name: str) -> AdapterRecord:
        """Unload ``name``: running requests finish, new and queued ones get unknown-adapter."""
        record = self.registry.unregister(name)
        self._commands.put(("unload", name))
        return record

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, name = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "register":
                self._on_register(name)
            else:
                self._on_unload(name)

    def _on_register(self, name: str) -> None:
        record = self.registry.lookup(name)
        if record is None:
            return
        self._failures.pop(name, None)
        entry = self.cache.get(name)
        if entry is not None and record.pinned:
            entry.pinned = True
        if record.pinned or self.cold_start.preloads:
            self._want(name)

    def _on_unload(self, name: str) -> None:
        job = self._jobs.pop(name, None)
        if job is not None:
            job.cancelled = True
        if name in self._pending:
            self._pending.remove(name)
        self.cache.remove(name)
        self._unfresh(name)
        self.host_store.drop(name)
        self._failures.pop(name, None)
        log.info("adapter %s unloaded", name)

    # ---- the AdapterResidency protocol (step loop) --------------------------------------
    def rank(self, name: str) -> int:
        try:
            return self.registry.resolve(name).rank
        except AdapterNotFoundError:
            raise UnknownAdapterError(name) from None
        except (RegistryError, AdapterError) as exc:
            raise AdapterUnavailableError(name, str(exc)) from None

    def prefetch(self, name: str) -> None:
        """A request for ``name`` arrived: count a hit or a miss, and start loading on a miss."""
        with self._lock:
            self._asked[name] = self._polls
            entry = self.cache.get(name)
            if entry is not None and entry.usable:
                self.counters.hits += 1
                self.cache.touch(name)
                return
            self.counters.misses += 1
            self._failures.pop(name, None)  # a new request retries a failed load
            self._want(name)

    def admit(self, name: str, tokens: int, assist: bool = True) -> Admit:
        """``DEVICE`` when every layer of ``name`` is resident, else what the cold-start strategy says
        (``ASSISTED`` only when ``assist``: a request that fell back once waits for its load)."""
        with self._lock:
            self._asked[name] = self._polls
            entry = self.cache.get(name)
            if entry is not None and entry.usable:
                return Admit.DEVICE
            self._want(name)
            if not assist:
                return Admit.WAIT
            return self.cold_start.admit(name, tokens, self.cache.get(name))

    def failure(self, name: str) -> str | None:
        """Why requests waiting for ``name`` can never run (unloaded, load failed, too big), or None."""
        with self._lock:
            if self.registry.lookup(name) is None:
                return f"unknown adapter '{name}'"
            return self._failures.get(name)

    def device_adapter(self, name: str) -> LoraAdapter | None:
        """The device copy of ``name`` (possibly only the layer groups landed so far), or None."""
        entry = self.cache.get(name)
        return entry.adapter if entry is not None else None

    def external(self, request_id: str, name: str) -> ExternalSource | None:
        """The request's CPU-computed deltas for this step (None: every delta it needs is on the device)."""
        return self.cold_start.source(request_id, self.cache.get(name))

    def deltas(self) -> ExternalDeltas | None:
        """What computes the external sources' deltas this step."""
        return self.cold_start.deltas()

    def resident_layers(self, name: str) -> set[int]:
        """Layers of ``name`` whose weights are on the device now."""
        entry = self.cache.get(name)
        return set(entry.resident_layers) if entry is not None else set()

    def acquire(self, request_id: str, name: str, verdict: Admit) -> None:
        """A request of ``name`` starts running (pins the adapter against eviction); an ``ASSISTED``
        one gets its external source."""
        with self._lock:
            self.cache.acquire(name)
            self._unfresh(name)
            if verdict is Admit.ASSISTED:
                self.cold_start.open(request_id, name)

    def release(self, request_id: str, name: str) -> None:
        """A request of ``name`` stopped running: its external source (if any) is closed."""
        with self._lock:
            self.cold_start.close(request_id)
            self.cache.release(name)

    def names(self) -> list[str]:
        return self.registry.names()

    def poll(self) -> None:
        """Publish landed layer groups, then start the loads that fit (never blocks)."""
        with self._lock:
            self._polls += 1
            self._apply_commands()
            for landed in self.loader.landed():
                self._on_landed(landed)
            self._expire_fresh()
            self.cache.undrain()
            self._start_loads()

    # ---- loads -------------------------------------------------------------------------
    def _want(self, name: str) -> None:
        if name in self.cache or name in self._pending or name in self._failures:
            return
        record = self.registry.lookup(name)
        if record is None:
            return
        if record.nbytes > self.cache.budget_bytes:
            self._failures[name] = (f"adapter '{name}' needs {record.nbytes} bytes, more than the whole device "
                                    f"adapter budget of {self.cache.budget_bytes} bytes")
            return
        self._pending.append(name)

    def _start_loads(self) -> None:
        while self._pending:
            name = self._pending[0]
            record = self.registry.lookup(name)
            if record is None or name in self.cache:
                self._pending.popleft()
                continue
            room = self.cache.budget_bytes - self.cache.pinned_bytes
            if record.nbytes > room:
                self._pending.popleft()
                self._failures[name] = (f"adapter '{name}' needs {record.nbytes} bytes; pinned adapters leave "
                                        f"only {room} of the device adapter budget")
                continue
            if not self.cache.can_reserve(record.nbytes):
                # FIFO: the head waits for running requests to release space, and busy
                # adapters take no new requests meanwhile, so it is never starved.
                self.cache.drain(record.nbytes - self.cache.free_bytes - self.cache.evictable_bytes()
                                 - self.cache.draining_bytes())
                return
            self._pending.popleft()
            self.counters.evictions += len(self.cache.reserve(name, record.nbytes, self._empty_adapter(record),
                                                              record.pinned))
            self._jobs[name] = self.loader.submit(record)

    def _on_landed(self, landed: Landed) -> None:
        name = landed.job.name
        if self._jobs.get(name) is not landed.job:
            return  # the load was cancelled (adapter unloaded)
        entry = self.cache.get(name)
        assert entry is not None
        if landed.error is not None:
            del self._jobs[name]
            self.cache.remove(name)
            self._failures[name] = landed.error
            self.counters.load_failures += 1
            log.warning("%s", landed.error)
            return
        self.link.publish(landed.weights)
        entry.adapter.weights.update(landed.weights)
        entry.resident_layers.update(landed.layers)
        if landed.last:
            del self._jobs[name]
            entry.resident, entry.fresh = True, True
            self._fresh.add(name)
            self.counters.loads += 1
            self.counters.load_ms.observe(landed.load_s * 1e3)
            for transition, seconds in landed.transitions():
                for listener in self._load_listeners:
                    listener(name, transition, seconds)

    def add_load_listener(self, listener: LoadListener) -> None:
        """Call ``listener(name, transition, seconds)`` for each finished load (step-loop thread)."""
        self._load_listeners.append(listener)

    def _expire_fresh(self) -> None:
        """A just-loaded adapter is kept from eviction only while waiting requests still ask for it."""
        for name in [n for n in self._fresh if self._asked.get(n, -1) < self._polls - 1]:
            self._unfresh(name)
        if len(self._asked) > 1024:
            self._asked = {n: p for n, p in self._asked.items() if p >= self._polls - 1}

    def _unfresh(self, name: str) -> None:
        self._fresh.discard(name)
        entry = self.cache.get(name)
        if entry is not None:
            entry.fresh = False

    def loads_in_flight(self) -> int:
        """Loads submitted to the loader and not yet fully landed."""
        with self._lock:
            return len(self._jobs)

    def pending_loads(self) -> int:
        """Loads in flight plus loads waiting for device space (cached mode: preloads left)."""
        with self._lock:
            return len(self._jobs) + len(self._pending)

    def wait_for_progress(self, timeout: float) -> bool:
        """Block until a load makes progress or ``timeout`` passes (idle step loops, benches)."""
        return self.loader.wait(timeout)

    def _warm_host(self, records: list[AdapterRecord]) -> None:
        """Copy the adapter root's adapters into host memory (warm_host), until the budget is full."""
        run_torch_serially()
        for record in records:
            if self._closing.is_set():
                return
            try:
                if not self.host_store.warm(record):
                    log.info("host memory full: %s and later adapters start cold on disk", record.name)
                    return
            except AdapterError as exc:
                log.warning("adapter %s not copied into host memory: %s", record.name, exc)

    def close(self) -> None:
        """Stop the loader and release shared memory (the ring, the host store's segments)."""
        self._closing.set()
        if self._warmer is not None:
            self._warmer.join()
        self.loader.close()
        self.cold_start.shutdown()
        if self.owns_host_store:
            self.host_store.close()

    def demote(self, name: str, level: str) -> None:
        """Take ``name`` off the device, keeping it in ``host`` memory or on ``disk`` only
        (cold-start profiling). Step-loop thread only.

        Raises ValueError for another level, an unknown adapter, or one that a request
        is using or that is still loading.
        """
        if level not in ("host", "disk"):
            raise ValueError(f"level must be host or disk, got {level!r}")
        with self._lock:
            record = self.registry.lookup(name)
            if record is None:
                raise ValueError(f"unknown adapter '{name}'")
            entry = self.cache.get(name)
            if name in self._jobs or (entry is not None and entry.users):
                raise ValueError(f"adapter '{name}' is loading or in use; it cannot be demoted now")
            self.cache.remove(name)
            self._unfresh(name)
            if level == "host":
                self.host_store.get(record)
            else:
                self.host_store.drop(name)

    # ---- residency visibility (any thread) ---------------------------------------------
    def level(self, name: str) -> str:
        """Where ``name`` lives now: ``device`` (fully resident), ``host`` or ``disk``."""
        entry = self.cache.get(name)
        if entry is not None and entry.resident:
            return "device"
        return "host" if self.host_store.contains(name) or name in self._jobs else "disk"

    def adapter_infos(self) -> list[AdapterInfo]:
        """Every registered adapter with its tier, for ``WorkerState.adapters``."""
        with self._lock:
            return [AdapterInfo(r.name, r.rank, self.level(r.name), r.pinned) for r in self.registry.records()]

    def assist_report(self) -> AssistReport:
        """CPU-assisted prefill alone, without the per-adapter walk of :meth:`report`."""
        with self._lock:
            return self.cold_start.report()

    def report(self) -> ResidencyReport:
        """Tiers, budgets, counters, the link and the CPU pool, for worker metrics and benches."""
        with self._lock:
            users = {e.name: e.users for e in self.cache.entries()}
            adapters = [AdapterResidencyInfo(r.name, r.rank, self.level(r.name), r.pinned, r.nbytes,
                                             users.get(r.name, 0)) for r in self.registry.records()]
            budget = self.cache.budget_bytes
            return ResidencyReport(
                mode=self.cold_start.mode, adapters=adapters,
                device_budget_bytes=None if budget == sys.maxsize else budget, device_used_bytes=self.cache.used_bytes,
                loading=sorted(self._jobs), waiting_for_space=list(self._pending),
                host_budget_bytes=self.host_store.budget_bytes, host_used_bytes=self.host_store.used_bytes,
                host_evictions=self.host_store.evictions, link_emulated=self.link.emulated,
                link_gbps=self.link.gbps, link_latency_ms=self.link.latency_ms,
                counters=replace(self.counters, load_ms=replace(self.counters.load_ms,
                                                                counts=list(self.counters.load_ms.counts))),
                assist=self.cold_start.report())
