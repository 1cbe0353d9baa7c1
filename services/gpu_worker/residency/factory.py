"""Builds a worker's adapter residency: the one place that picks the cold-start strategy.

``cpu_assist`` also creates the worker's shared-memory ring (after removing segments a
killed earlier run of this worker id left behind), keeps host copies of adapters in shared
memory so the CPU prefill pool maps them, and returns the :class:`PoolHealth` the service
feeds with the pool's hello and heartbeats.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from services.gpu_worker.residency.assist_exchange import AssistExchange
from services.gpu_worker.residency.cold_start import Cached, ColdStart, OnDemand
from services.gpu_worker.residency.config import DEFAULT_TOKENS_PER_CORE, ResidencyConfig
from services.gpu_worker.residency.cpu_assist import CpuAssist
from services.gpu_worker.residency.host_store import HostStore
from services.gpu_worker.residency.link import Layout, Link
from services.gpu_worker.residency.pool_health import PoolHealth
from services.gpu_worker.residency.tiered import TieredResidency
from shared.core_split import host_cores, pool_cores, worker_cores
from shared.llama_shape import LlamaShape
from shared.shm_exchange import ExchangeRing, RingGeometry, remove_stale_segments, segment_prefix

log = logging.getLogger(__name__)

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


@dataclass(frozen=True)
class Model:
    """What residency needs to know of the served model and engine."""

    shape: LlamaShape
    max_rank: int
    dtype: torch.dtype
    device: str
    max_tokens: int  # tokens a step may carry (a ring slot's capacity)
    base_model: str | None = None
    layout: Layout | None = None  # how the device tier keeps (A, B) for the LoRA kernel (None: as loaded)


@dataclass
class Built:
    """A residency and, in cpu_assist mode, the health of its CPU prefill pool."""

    residency: TieredResidency
    pool: PoolHealth | None


def tokens_per_core(config: ResidencyConfig) -> int:
    """c: explicit, else from the ``--cpu-prefill`` profile, else DEFAULT_TOKENS_PER_CORE."""
    if config.assist_tokens_per_core:
        return config.assist_tokens_per_core
    if config.cpu_prefill_profile:
        profile = json.loads(Path(config.cpu_prefill_profile).read_text())
        return max(1, int(profile["cpu_prefill"]["tokens_per_core"]))
    return DEFAULT_TOKENS_PER_CORE


def make_residency(config: ResidencyConfig, model: Model, worker_id: str = "local",
                   adapters: dict[str, str | Path] | None = None, host_store: HostStore | None = None,
                   link: Link | None = None) -> Built:
    """The residency for ``config.cold_start`` (``host_store``/``link``: shared by benches)."""
    pin = torch.device(model.device).type == "cuda"
    pool = None
    if config.cold_start == "cpu_assist":
        removed = remove_stale_segments(worker_id)
        if removed:
            log.info("removed %d shared-memory segments left by a dead run of worker %s", len(removed), worker_id)
        prefix = segment_prefix(worker_id)
        store = host_store or HostStore(config.host_adapter_bytes, model.shape, model.max_rank, model.dtype, pin,
                                        model.base_model, shared_prefix=prefix)
        strategy, pool = _cpu_assist(config, model, worker_id, prefix, store)
    else:
        store = host_store or HostStore(config.host_adapter_bytes, model.shape, model.max_rank, model.dtype, pin,
                                        model.base_model, layout=model.layout)
        strategy = Cached() if config.cold_start == "cached" else OnDemand()
    residency = TieredResidency(config, model.shape, model.max_rank, model.dtype, model.device, store, strategy,
                                adapters, link, owns_host_store=host_store is None, layout=model.layout)
    return Built(residency, pool)


@dataclass
class CoreLease:
    """This process runs on ``mine`` while the pool has ``pool``; :meth:`release` gives every core back."""

    cores: list[int]
    threads: int
    mine: list[int]
    pool: list[int]

    @classmethod
    def take(cls, pool_workers: int) -> "CoreLease":
        """Restrict this process (and torch's threads) to the cores the pool does not take."""
        cores = host_cores()
        lease = cls(cores, torch.get_num_threads(), worker_cores(pool_workers, cores), pool_cores(pool_workers, cores))
        if len(lease.mine) < len(cores):
            os.sched_setaffinity(0, lease.mine)
            torch.set_num_threads(max(1, min(lease.threads, len(lease.mine))))
            log.info("cpu_assist: the worker keeps cores %s, its CPU prefill pool takes cores %s", lease.mine,
                     lease.pool)
        return lease

    def release(self) -> None:
        os.sched_setaffinity(0, self.cores)
        torch.set_num_threads(self.threads)


def _cpu_assist(config: ResidencyConfig, model: Model, worker_id: str, prefix: str,
                store: HostStore) -> tuple[ColdStart, PoolHealth]:
    geometry = RingGeometry(model.shape, DTYPE_NAMES[model.dtype], model.max_tokens, config.assist_slots,
                            config.pool_workers())
    ring = ExchangeRing.create(prefix, geometry, pin=torch.device(model.device).type == "cuda")
    c = tokens_per_core(config)
    exchange = AssistExchange(ring, c, config.assist_deadline_ms / 1e3, torch.device(model.device))
    lease = CoreLease.take(geometry.num_cpu_workers)
    pool = PoolHealth(worker_id, ring.name, geometry, cores=lease.pool)
    log.info("cpu_assist: ring %s, %d slots of %d tokens, %d CPU workers, %d tokens per core", ring.name,
             geometry.num_slots, geometry.max_tokens, geometry.num_cpu_workers, c)
    return CpuAssist(exchange, pool, store, lease.release), pool
