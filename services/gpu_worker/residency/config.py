"""Configuration of adapter residency: the adapter root, the host and device budgets, the link.

``cold_start`` picks what a request whose adapter is not on the device does:

* ``cached``: every adapter known at start-up (configured ones and every subdirectory of
  the adapter root) is preloaded onto the device and never evicted; the ideal.
* ``on_demand``: the request waits for its adapter to load before its prefill (as S-LoRA
  does); requests already running keep decoding meanwhile.
* ``cpu_assist``: the request's prefill starts as soon as the load has started; the CPU
  prefill pool computes the LoRA deltas of the layers not resident yet (CaraServe).

On a CPU-only host the host-to-device link is EMULATED (``emulate_link_gbps``,
``emulate_link_latency_ms``): a copy of ``n`` bytes costs ``latency + n / G``, so that
cold starts are reproducible. On CUDA the real link is used and those flags are ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shared.config import check_choice, option, require

COLD_START_MODES = ("cached", "on_demand", "cpu_assist")
DEFAULT_TOKENS_PER_CORE = 128
GiB = 1024 ** 3


@dataclass
class ResidencyConfig:
    """Where adapters live and how they move between disk, host memory and the device."""

    adapter_dir: str = option("", "adapter root: each subdirectory is a PEFT adapter, found by name on first "
                                  "use; adapters registered at runtime must lie inside it")
    cold_start: str = option("on_demand", "what a request for an adapter not on the device does: cached preloads "
                                          "every adapter, on_demand waits for the load before prefill, "
                                          "cpu_assist prefills at once with CPU-computed LoRA deltas",
                             COLD_START_MODES)
    host_adapter_bytes: int = option(8 * GiB, "host-memory budget for adapter weights (pinned where CUDA "
                                              "exists); least recently used adapters go back to disk-only")
    device_adapter_bytes: int = option(0, "device-memory budget for adapter weights; 0 uses "
                                          "device_adapter_fraction of the free memory")
    device_adapter_fraction: float = option(0.1, "share of free device memory for adapter weights when "
                                                 "device_adapter_bytes is 0")
    emulate_link_gbps: float = option(0.0, "CPU-only hosts: EMULATED host-to-device bandwidth G in GB/s "
                                           "(1e9 bytes/s); 0 copies at memory speed")
    emulate_link_latency_ms: float = option(0.0, "CPU-only hosts: EMULATED latency L of each adapter load (ms)")
    warm_host: bool = option(True, "copy each registered adapter into host memory while the host budget has "
                                   "room, so cold starts begin in host memory rather than on disk")
    load_groups: int = option(4, "copy each adapter in this many layer groups; a layer group is usable as soon "
                                 "as it lands (cpu_assist hands it over to the device path from then on)")
    cpu_prefill_workers: int = option(0, "cpu_assist: CPU processes in the prefill pool; 0 = half the cores, "
                                         "1 to 4")
    assist_slots: int = option(8, "cpu_assist: requests assisted at once (slots of the shared-memory ring)")
    assist_tokens_per_core: int = option(0, "cpu_assist: tokens one CPU core computes within the device's "
                                            "per-layer time (c); 0 = the --cpu-prefill profile's, else "
                                            f"{DEFAULT_TOKENS_PER_CORE}")
    cpu_prefill_profile: str = option("", "cpu_assist: a profile JSON from `caraserve profile --cpu-prefill` "
                                          "giving tokens_per_core")
    assist_deadline_ms: float = option(1000.0, "cpu_assist: how long a layer's CPU deltas may take before the "
                                               "request falls back to waiting for its load")

    def __post_init__(self) -> None:
        check_choice("cold_start", self.cold_start, COLD_START_MODES)
        require(not self.adapter_dir or Path(self.adapter_dir).is_dir(),
                f"adapter_dir {self.adapter_dir!r} is not a directory")
        require(self.host_adapter_bytes >= 0, "host_adapter_bytes must be >= 0")
        require(self.device_adapter_bytes >= 0, "device_adapter_bytes must be >= 0")
        require(0.0 < self.device_adapter_fraction <= 1.0, "device_adapter_fraction must be in (0, 1]")
        require(self.emulate_link_gbps >= 0.0, "emulate_link_gbps must be >= 0")
        require(self.emulate_link_latency_ms >= 0.0, "emulate_link_latency_ms must be >= 0")
        require(1 <= self.load_groups <= 1024, "load_groups must be in [1, 1024]")
        require(0 <= self.cpu_prefill_workers <= 256, "cpu_prefill_workers must be in [0, 256]")
        require(1 <= self.assist_slots <= 256, "assist_slots must be in [1, 256]")
        require(self.assist_tokens_per_core >= 0, "assist_tokens_per_core must be >= 0")
        require(not self.cpu_prefill_profile or Path(self.cpu_prefill_profile).is_file(),
                f"cpu_prefill_profile {self.cpu_prefill_profile!r} is not a file")
        require(self.assist_deadline_ms > 0, "assist_deadline_ms must be > 0")

    def pool_workers(self) -> int:
        """The CPU prefill pool's size: as configured, else half the cores (1 to 4)."""
        if self.cpu_prefill_workers:
            return self.cpu_prefill_workers
        return max(1, min(4, len(os.sched_getaffinity(0)) // 2))

    @property
    def emulates_link(self) -> bool:
        return self.emulate_link_gbps > 0 or self.emulate_link_latency_ms > 0
