"""The typed residency report a worker publishes in its metrics and reads in its benches."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from services.gpu_worker.residency.metrics import ResidencyCounters


@dataclass
class AdapterResidencyInfo:
    """One registered adapter: where it lives and how many running requests use it."""

    name: str
    rank: int
    level: str
    pinned: bool
    nbytes: int
    in_use: int


@dataclass
class AssistReport:
    """CPU-assisted prefill: what the pool did and whether it is there."""

    assisted: int = 0  # requests admitted with CPU-computed deltas
    fallbacks: int = 0  # assisted requests that fell back to waiting for their load
    cpu_layers: int = 0  # (request, layer) deltas computed on the CPU
    pool_workers: int = 0  # CPU processes the pool should have
    pool_alive: int = 0  # CPU processes its last heartbeat reported
    pool_healthy: bool = False
    open_sources: int = 0
    exchange_calls: int = 0  # (layer, input group) exchanges with the pool
    exchange_layers: int = 0  # (step, layer) pairs that had exchanges
    exchange_overhead_ms: float = 0.0  # their total copy-in + wait-after-the-GEMM + add time
    late: int = 0  # exchanges that missed their deadline


@dataclass
class ResidencyReport:
    """Tiers, budgets, counters and the pool, as of one moment."""

    mode: str
    adapters: list[AdapterResidencyInfo]
    device_budget_bytes: int | None
    device_used_bytes: int
    loading: list[str]
    waiting_for_space: list[str]
    host_budget_bytes: int
    host_used_bytes: int
    host_evictions: int
    link_emulated: bool
    link_gbps: float | None
    link_latency_ms: float
    counters: ResidencyCounters
    assist: AssistReport = field(default_factory=AssistReport)

    def to_dict(self) -> dict:
        """The JSON form (worker metrics, bench results)."""
        return {"mode": self.mode, "adapters": [asdict(a) for a in self.adapters],
                "device": {"budget_bytes": self.device_budget_bytes, "used_bytes": self.device_used_bytes,
                           "loading": self.loading, "waiting_for_space": self.waiting_for_space},
                "host": {"budget_bytes": self.host_budget_bytes, "used_bytes": self.host_used_bytes,
                         "evictions": self.host_evictions},
                "link": {"emulated": self.link_emulated, "gbps": self.link_gbps, "latency_ms": self.link_latency_ms},
                "assist": asdict(self.assist), **self.counters.to_dict()}
