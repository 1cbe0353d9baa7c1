"""The host-to-device link adapter weights cross, real (CUDA) or EMULATED (CPU-only hosts).

A link copies one adapter load as a sequence of layer groups: :meth:`begin` starts a
transfer, :meth:`send` issues one group's copies and returns a handle, and
:meth:`wait` blocks the calling (loader) thread until that group has landed.

* :class:`CudaLink` issues ``non_blocking`` copies from page-locked host memory on its own
  stream and records an event per group; :meth:`wait` synchronizes on that event only
  (no device-wide sync), and the step loop never waits on it.
* :class:`EmulatedLink` is for CPU-only hosts, where "device" memory is host memory: the
  device cache holds the host store's own tensors (read-only from here on, as device
  weights are), and the loader thread sleeps until the time an EMULATED link of ``gbps``
  GB/s (1e9 bytes/s) and ``latency_ms`` would have delivered them: a transfer of ``n``
  bytes costs ``latency + n / G``, the latency charged once per adapter load. The sleep is
  the emulated wire, on the loader thread only. No bytes move: a real link's copy is DMA,
  which spends no CPU time, and a second copy in the same memory would only double the
  adapters' share of the worker's RSS. The one exception is ``layout`` (with the native CPU
  kernel, lora_ops.kernel_layout): weights not yet in that kernel's pair layouts (the plain
  shared-memory host copies of ``cpu_assist`` mode) are laid out into a device copy on the
  loader thread; host copies the host store already laid out pass as they are.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Protocol

import torch

log = logging.getLogger(__name__)

Weights = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
Layout = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (A, B) -> device (A, B)


def weights_nbytes(weights: Weights) -> int:
    return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in weights.values())


class Link(Protocol):
    emulated: bool
    gbps: float | None  # the emulated bandwidth (None: a real link)
    latency_ms: float  # the emulated per-load latency (0 on a real link)

    def begin(self) -> None:
        """A new adapter transfer starts."""

    def send(self, weights: Weights) -> tuple[Weights, object]:
        """Issue the copies of one layer group; returns (device weights, handle for :meth:`wait`)."""

    def wait(self, handle: object) -> None:
        """Block the calling thread until the group of ``handle`` has landed."""

    def publish(self, weights: Weights) -> None:
        """Called by the step loop when a landed group becomes visible to the compute stream."""


class EmulatedLink:
    """An EMULATED host-to-device link: ``latency + bytes / G`` per adapter load."""

    def __init__(self, gbps: float, latency_ms: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, layout: Layout | None = None) -> None:
        self.gbps, self.latency_ms, self.latency_s = gbps, latency_ms, latency_ms / 1e3
        self.layout = layout
        self._clock, self._sleep = clock, sleep
        self._deadline = 0.0
        self.emulated = gbps > 0 or latency_ms > 0
        if self.emulated:
            log.info("EMULATED host-to-device link: %s GB/s, %.3f ms latency per load (emulation, not hardware)",
                     gbps or "unlimited", latency_ms)

    def cost_s(self, nbytes: int) -> float:
        """Seconds the emulated link takes for one load of ``nbytes``: ``latency + bytes / G``."""
        return self.latency_s + (nbytes / (self.gbps * 1e9) if self.gbps > 0 else 0.0)

    def begin(self) -> None:
        self._deadline = self._clock() + self.latency_s

    def send(self, weights: Weights) -> tuple[Weights, object]:
        """The group's own tensors (the "device" is host memory; in ``layout`` when given), landing
        after its emulated wire time."""
        if self.gbps > 0:
            self._deadline += weights_nbytes(weights) / (self.gbps * 1e9)
        if self.layout is None:
            return dict(weights), self._deadline
        return {k: self.layout(a, b) for k, (a, b) in weights.items()}, self._deadline

    def wait(self, handle: object) -> None:
        remaining = float(handle) - self._clock()  # type: ignore[arg-type]
        if remaining > 0:
            self._sleep(remaining)

    def publish(self, weights: Weights) -> None:
        return None


class CudaLink:
    """The real link: async copies from pinned memory on a dedicated stream, one event per group."""

    emulated = False
    gbps = None
    latency_ms = 0.0

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)

    def begin(self) -> None:
        return None

    def send(self, weights: Weights) -> tuple[Weights, object]:
        with torch.cuda.stream(self.stream):
            copied = {k: (a.to(self.device, non_blocking=True), b.to(self.device, non_blocking=True))
                      for k, (a, b) in weights.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        return copied, event

    def wait(self, handle: object) -> None:
        handle.synchronize()  # type: ignore[attr-defined]  # this event only, on the loader thread

    def publish(self, weights: Weights) -> None:
        """Tie the tensors (allocated on the load stream) to the compute stream for the allocator."""
        stream = torch.cuda.current_stream(self.device)
        for a, b in weights.values():
            a.record_stream(stream)
            b.record_stream(stream)


def make_link(device: str, gbps: float, latency_ms: float, layout: Layout | None = None) -> Link:
    """CudaLink on CUDA (emulation flags ignored with a warning), else an EmulatedLink that puts
    weights in ``layout`` (the CPU kernel's, or None: as they are)."""
    if torch.device(device).type == "cuda":
        if gbps > 0 or latency_ms > 0:
            log.warning("--emulate-link-* applies to CPU-only hosts; using the real CUDA link")
        return CudaLink(device)
    return EmulatedLink(gbps, latency_ms, layout=layout)
