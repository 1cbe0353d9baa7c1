"""Make a SYNTHETIC profile from the paper's published numbers (for development only).

Until `caraserve profile` has measured the real engine, the simulator and the
scheduling sweep can be exercised with profiles fitted to samples drawn from the
paper's Llama2-7B/A100 figures (../shared/reference/paper-notes.md):

- decode, BGMV: the motivating example's two operating points (24 x rank 32 at
  34.8 ms, 16 x rank 64 at 35.8 ms) give ``31.8 ms + 3.906 us * |S| * max_rank``;
- decode, MBGMV: 35.3 / 35.9 ms give ``33.5 ms + 2.344 us * sum_rank``;
- prefill: 256 / 1024 tokens take 44 / 90 ms: ``28.5 ms + 61.3 us * tokens``, plus
  ``0.27 us`` per token x rank (about +10% at rank 64 and 256 tokens);
- cold start with the adapter in host memory: ``2 ms + 60 us * rank``; on disk ten times that.

Samples get 1% multiplicative noise. The JSON carries ``"synthetic": true``; never
commit such a profile or results made from it under bench/results.

    python -m bench.routing.synthetic_profile --backend bgmv --out /tmp/bgmv.json
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from shared.perf_model import COLD_LEVELS, PerfModel, ProfileInfo, sample_stats

BATCHES = (1, 2, 4, 8, 16, 32, 64)
RANKS = (8, 16, 32, 64)
TRUTH = {
    "bgmv": {"decode": {"const": 31800.0, "batch_max_rank": 1e3 / 256},
             "prefill": {"const": 28500.0, "tokens": 61.3, "tokens_max_rank": 0.27}},
    "mbgmv": {"decode": {"const": 33500.0, "sum_rank": 0.6e3 / 256},
              "prefill": {"const": 28500.0, "tokens": 61.3, "token_rank": 0.27}},
}
COLD = {"host": {"const": 2000.0, "sum_rank": 60.0}, "disk": {"const": 20000.0, "sum_rank": 600.0}}


def _rank_mixes(batch: int, rng: np.random.Generator) -> list[list[int]]:
    mixes = [[r] * batch for r in RANKS]
    mixes += [rng.choice(RANKS, size=batch).tolist() for _ in range(4)]
    return mixes


def synthetic_samples(backend: str, seed: int = 0, noise: float = 0.01) -> list[dict]:
    """Profile samples drawn from TRUTH[backend] with multiplicative Gaussian noise."""
    rng = np.random.default_rng(seed)
    truth = PerfModel.from_coefficients(backend, TRUTH[backend]["decode"], TRUTH[backend]["prefill"], COLD)
    samples = []

    def record(phase: str, ranks: list[int], tokens: list[int], latency: float) -> None:
        samples.append({"phase": phase, "ranks": [int(r) for r in ranks], "tokens": [int(t) for t in tokens],
                        "latency_us": float(latency * (1.0 + noise * rng.standard_normal()))})

    for batch in BATCHES:
        for ranks in _rank_mixes(batch, rng):
            ctx = rng.integers(16, 1024, size=batch).tolist()
            stats = _stats(ranks, ctx)
            record("decode", ranks, ctx, truth.decode_us(stats))
    for batch in (1, 2, 4, 8):
        for ranks in _rank_mixes(batch, rng):
            prompts = rng.integers(16, 1024, size=batch).tolist()
            record("prefill", ranks, prompts, truth.prefill_us(_stats(ranks, prompts)))
    for level in COLD_LEVELS:
        for rank in RANKS:
            for tokens in (32, 128, 512):
                record(f"cold_{level}", [rank], [tokens], truth.cold_start_us(rank, tokens, level))
    return samples


def _stats(ranks: list[int], tokens: list[int]):
    return sample_stats({"ranks": ranks, "tokens": tokens})


def make_synthetic_profile(backend: str, seed: int = 0) -> PerfModel:
    """A PerfModel fitted to ``synthetic_samples``, labelled synthetic."""
    info = ProfileInfo(backend=backend, device="synthetic", device_name="paper-a100-synthetic",
                       model="llama2-7b-paper-synthetic", model_digest="synthetic", dtype="float16",
                       synthetic=True)
    return PerfModel.fit(synthetic_samples(backend, seed), info, seed=seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=tuple(TRUTH), required=True)
    parser.add_argument("--out", required=True, help="profile JSON to write (not under bench/results)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = make_synthetic_profile(args.backend, args.seed)
    model.save(args.out)
    print(f"wrote SYNTHETIC {args.backend} profile to {args.out}: decode {model.decode!r}; prefill {model.prefill!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
