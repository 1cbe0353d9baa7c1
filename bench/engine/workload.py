"""The engine benchmark's workload: its configuration and the seeded request list.

All requests arrive at t = 0. Each has a prompt of seeded random token ids, a fixed output
length (generated with ``ignore_eos``) and an adapter picked uniformly from the bench's
adapters. The same list is served by every configuration; base-only configurations ignore
the adapter names.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from shared.config import option, require

DEFAULT_RANKS = (8, 16, 32, 64)


@dataclass
class EngineWorkload:
    """What the engine benchmark serves (defaults: the issue's workload)."""

    num_requests: int = option(64, "requests, all submitted at t = 0")
    prompt_min: int = option(32, "shortest prompt in tokens")
    prompt_max: int = option(256, "longest prompt in tokens")
    output_min: int = option(16, "shortest output in tokens (ignore_eos)")
    output_max: int = option(128, "longest output in tokens (ignore_eos)")
    num_adapters: int = option(16, "LoRA adapters; request adapters are picked uniformly")
    ranks: tuple[int, ...] = option(DEFAULT_RANKS, "adapter ranks, cycled over the adapters")
    hf_batch_size: int = option(16, "static batch size of the transformers baselines")
    step_tokens: int = option(4096, "tokens per step (prefill + decode) of our engine and vLLM alike "
                                    "(vLLM's default for offline batches on CPU)")
    seed: int = option(0, "seed of prompts, lengths, adapter choice and adapter weights")

    def __post_init__(self) -> None:
        self.ranks = tuple(int(r) for r in self.ranks)
        require(self.num_requests >= 1, "num_requests must be >= 1")
        require(1 <= self.prompt_min <= self.prompt_max, "need 1 <= prompt_min <= prompt_max")
        require(2 <= self.output_min <= self.output_max, "need 2 <= output_min <= output_max (TPOT needs 2 tokens)")
        require(self.num_adapters >= 1, "num_adapters must be >= 1")
        require(bool(self.ranks) and all(r >= 1 for r in self.ranks), "ranks must be positive")
        require(self.hf_batch_size >= 1, "hf_batch_size must be >= 1")
        require(self.step_tokens >= 16, "step_tokens must be >= 16")

    def adapter_ranks(self) -> dict[str, int]:
        """Adapter name -> rank, ranks cycling through ``ranks``."""
        return {f"bench-{i:02d}-r{self.ranks[i % len(self.ranks)]}": self.ranks[i % len(self.ranks)]
                for i in range(self.num_adapters)}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ranks"] = list(self.ranks)
        return out


@dataclass(frozen=True)
class BenchRequest:
    """One request of the workload."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    adapter: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BenchRequest":
        return cls(str(d["request_id"]), [int(t) for t in d["prompt_ids"]], int(d["max_tokens"]), str(d["adapter"]))


def make_requests(workload: EngineWorkload, vocab_size: int) -> list[BenchRequest]:
    """The seeded request list, in arrival order (token ids uniform in ``[0, vocab_size)``)."""
    rng = random.Random(workload.seed)
    names = list(workload.adapter_ranks())
    requests = []
    for i in range(workload.num_requests):
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(workload.prompt_min, workload.prompt_max))]
        requests.append(BenchRequest(f"req-{i:04d}", prompt, rng.randint(workload.output_min, workload.output_max),
                                     rng.choice(names)))
    return requests
