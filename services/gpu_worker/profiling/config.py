"""The profiling grid of `caraserve profile` (importable without torch, for the CLI's flags)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from shared.config import check_choice, option, require
from shared.llama_shape import PROJECTIONS


QUICK_GRID = {"batch_sizes": (1, 2, 4, 8, 16), "ranks": (8, 16, 64), "mixed_draws": 1, "decode_steps": 3,
              "repeats": 2, "prompt_max": 64}


@dataclass
class ProfileConfig:
    """The profiling grid."""

    batch_sizes: tuple[int, ...] = option((1, 2, 4, 8, 16, 32, 64), "decode batch sizes",
                                          default_factory=lambda: (1, 2, 4, 8, 16, 32, 64))
    ranks: tuple[int, ...] = option((8, 16, 32, 64), "adapter ranks", default_factory=lambda: (8, 16, 32, 64))
    mixed_draws: int = option(2, "heterogeneous rank mixes per batch size")
    decode_steps: int = option(5, "decode steps timed per grid point (their median is one sample)")
    repeats: int = option(3, "passes over the grid, each in shuffled order; a point keeps its fastest pass")
    prompt_min: int = option(32, "shortest prompt (tokens)")
    prompt_max: int = option(256, "longest prompt (tokens)")
    targets: tuple[str, ...] = option(PROJECTIONS, "projections the synthetic adapters adapt",
                                      default_factory=lambda: PROJECTIONS)
    seed: int = option(0, "seed of prompts and rank mixes")
    holdout_fraction: float = option(0.25, "share of samples held out for R^2")
    cold_start: bool = option(True, "also profile cold starts: the extra time to first token of a request whose "
                                    "adapter starts in host memory or on disk (on_demand loading)")
    emulate_link_gbps: float = option(0.0, "CPU-only hosts: EMULATED host-to-device bandwidth for the cold-start "
                                           "loads, as the workers' residency config sets it; 0: memory copy")
    emulate_link_latency_ms: float = option(0.0, "CPU-only hosts: EMULATED latency of each cold-start load (ms)")

    def quick(self) -> "ProfileConfig":
        """This config with the quick grid a worker runs at start (``QUICK_GRID``; well under
        2 minutes for both kernel families on a 2-core CPU host)."""
        return replace(self, **QUICK_GRID)

    def __post_init__(self) -> None:
        require(all(b >= 1 for b in self.batch_sizes) and self.batch_sizes, "batch sizes must be >= 1")
        require(all(r >= 1 for r in self.ranks) and self.ranks, "ranks must be >= 1")
        require(self.decode_steps >= 1 and self.mixed_draws >= 0, "decode_steps >= 1, mixed_draws >= 0")
        require(self.repeats >= 1, "repeats must be >= 1")
        require(1 <= self.prompt_min <= self.prompt_max, "need 1 <= prompt_min <= prompt_max")
        for t in self.targets:
            check_choice("targets", t, PROJECTIONS)
        require(0.0 < self.holdout_fraction < 1.0, "holdout_fraction must be in (0, 1)")
        require(self.emulate_link_gbps >= 0 and self.emulate_link_latency_ms >= 0,
                "emulate_link_gbps and emulate_link_latency_ms must be >= 0")
