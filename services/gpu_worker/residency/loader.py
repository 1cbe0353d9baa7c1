"""Asynchronous adapter loading, layer group by layer group, on a loader thread.

:meth:`AdapterLoader.submit` queues a load and returns at once. The loader thread takes
loads in FIFO order: it gets the adapter's host copy (reading it from disk on a host-store
miss), then sends its layers over the link in ``groups`` contiguous layer groups, and
reports each group as a :class:`Landed` record once it is on the device. The step loop
drains those records with :meth:`landed` (never blocking), so a group becomes visible
between two steps and an adapter can be used layer by layer while the rest still loads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.gpu_worker.residency.link import Link, Weights, weights_nbytes
from services.gpu_worker.residency.host_store import HostStore
from shared.adapter_registry import AdapterRecord
from shared.peft_adapter import AdapterError
from shared.thread_limits import run_torch_serially

log = logging.getLogger(__name__)

LOAD, ACTIVATE = "load", "activate"  # disk -> host memory, host memory -> device (vLLM's transitions)
LoadListener = Callable[[str, str, float], None]  # (adapter, transition, seconds) of a finished load


@dataclass
class LoadJob:
    """One adapter load; ``cancelled`` stops it between groups (the adapter was unloaded)."""

    record: AdapterRecord
    submitted: float = field(default_factory=time.monotonic)
    started: float = 0.0
    host_ready: float = 0.0  # when its host copy was there
    from_host: bool = False  # the host store already held it (no disk read)
    cancelled: bool = False

    @property
    def name(self) -> str:
        return self.record.name


@dataclass
class Landed:
    """A layer group of ``job`` is on the device (or the load failed: ``error``)."""

    job: LoadJob
    layers: range
    weights: Weights
    last: bool
    finished: float = field(default_factory=time.monotonic)
    error: str | None = None

    @property
    def load_s(self) -> float:
        """Seconds from the start of the load (host copy included) to this group landing."""
        return self.finished - self.job.started

    def transitions(self) -> list[tuple[str, float]]:
        """The finished load's ``(transition, seconds)``: ``load`` when it read the disk, then ``activate``."""
        activate = (ACTIVATE, self.finished - self.job.host_ready)
        return [activate] if self.job.from_host else [(LOAD, self.job.host_ready - self.job.started), activate]


def layer_groups(num_layers: int, groups: int) -> list[range]:
    """``range(num_layers)`` split into at most ``groups`` contiguous, near-equal ranges."""
    groups = max(1, min(groups, num_layers))
    bounds = [round(i * num_layers / groups) for i in range(groups + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(groups)]


class AdapterLoader:
    """A loader thread moving adapters host -> device over a :class:`Link`."""

    def __init__(self, host_store: HostStore, link: Link, num_layers: int, groups: int = 1) -> None:
        self.host_store, self.link = host_store, link
        self.groups = layer_groups(num_layers, groups)
        self._jobs: queue.SimpleQueue[LoadJob | None] = queue.SimpleQueue()
        self._landed: queue.SimpleQueue[Landed] = queue.SimpleQueue()
        self._progress = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="adapter-loader", daemon=True)
        self._thread.start()

    def submit(self, record: AdapterRecord) -> LoadJob:
        """Queue a load of ``record`` (returns immediately)."""
        job = LoadJob(record)
        self._jobs.put(job)
        return job

    def landed(self) -> list[Landed]:
        """Every group that landed since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._landed.get_nowait())
            except queue.Empty:
                self._progress.clear()
                if self._landed.empty():
                    return out

    def wait(self, timeout: float) -> bool:
        """Block until a group lands or ``timeout`` passes (for idle step loops); True if one did."""
        return self._progress.wait(timeout)

    def close(self) -> None:
        """Stop the loader thread: the group in flight finishes, queued loads are dropped."""
        self._closed = True
        self._jobs.put(None)
        self._thread.join(timeout=30)

    # ---- the loader thread -------------------------------------------------------------
    def _run(self) -> None:
        run_torch_serially()
        while (job := self._jobs.get()) is not None and not self._closed:
            job.started = time.monotonic()
            try:
                self._load(job)
            except AdapterError as exc:
                self._report(Landed(job, range(0), {}, True, error=str(exc)))
            except (OSError, RuntimeError, ValueError) as exc:
                log.exception("loading adapter %s failed", job.name)
                self._report(Landed(job, range(0), {}, True, error=f"adapter '{job.name}': load failed: {exc}"))

    def _load(self, job: LoadJob) -> None:
        if job.cancelled:
            self._report(Landed(job, range(0), {}, True, error=f"adapter '{job.name}' was unloaded"))
            return
        job.from_host = self.host_store.contains(job.name)
        host = self.host_store.get(job.record)
        job.host_ready = time.monotonic()
        self.link.begin()
        sent = []
        for layers in self.groups:
            group = {k: w for k, w in host.weights.items() if k[0] in layers}
            sent.append((layers, *self.link.send(group)))
        for i, (layers, weights, handle) in enumerate(sent):
            if self._closed:
                return
            self.link.wait(handle)
            self._report(Landed(job, layers, weights, i == len(sent) - 1))
        log.debug("adapter %s: %d bytes in %.1f ms", job.name, weights_nbytes(host.weights),
                  (time.monotonic() - job.started) * 1e3)

    def _report(self, landed: Landed) -> None:
        self._landed.put(landed)
        self._progress.set()
