"""How the engine benchmark runs its configurations (as opposed to what it serves)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from bench.engine.configs import CONFIGS
from shared.config import check_choice, option, require

OMP_WAIT_POLICIES = ("passive", "active", "inherit")


@dataclass
class RunOptions:
    """Device, configurations, process isolation, repetition and the vLLM venv of one benchmark invocation."""

    device: str = option("cpu", "torch device the configurations run on", ("cpu", "cuda"))
    configs: tuple[str, ...] = option(tuple(CONFIGS), "configuration keys to run, in order")
    threads: int = option(0, "torch threads; 0: one per core of this process's CPU affinity")
    isolate: bool = option(True, "run every configuration in a fresh process (per-run peak RSS)")
    repeats: int = option(1, "rounds over all configurations; each reports its best round")
    peak_size: int = option(0, "side of the square bf16 matmul measuring the peak; 0: 2048 on CPU, 8192 on CUDA")
    bandwidth_bytes: int = option(0, "tensor size measuring memory bandwidth; 0: 2 GiB on CUDA, "
                                     "on CPU 4x the last-level cache (at least 1 GiB)")
    vllm_python: str = option(".venv-vllm/bin/python", "Python of the vLLM venv (relative to the repository)")
    omp_wait_policy: str = option("inherit", "OMP_WAIT_POLICY of isolated processes (inherit: the runtime's "
                                             "default, what a user gets)", OMP_WAIT_POLICIES)

    def __post_init__(self) -> None:
        self.configs = tuple(self.configs)
        check_choice("device", self.device, ("cpu", "cuda"))
        require(bool(self.configs), "configs must name at least one configuration")
        for key in self.configs:
            check_choice("configs", key, tuple(CONFIGS))
        require(len(set(self.configs)) == len(self.configs), "configs must not repeat a configuration")
        require(self.threads >= 0, "threads must be >= 0")
        require(self.repeats >= 1, "repeats must be >= 1")
        require(self.peak_size >= 0, "peak_size must be >= 0")
        require(self.bandwidth_bytes >= 0, "bandwidth_bytes must be >= 0")
        require(bool(self.vllm_python), "vllm_python must name a Python executable")
        check_choice("omp_wait_policy", self.omp_wait_policy, OMP_WAIT_POLICIES)

    def resolved_threads(self) -> int:
        """The torch thread count every configuration uses."""
        return self.threads or len(os.sched_getaffinity(0))
