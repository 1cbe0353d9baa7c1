"""The performance model of batched multi-LoRA steps, fitted from profiles (microseconds).

Every cost is linear in features of a set of requests S (a :class:`BatchStats`);
an empty set costs 0. The feature catalogue (``TERMS``), with why each may matter:

- ``const``: 1 -- fixed per-step cost (kernel launches, LM head, Python overhead);
- ``requests``: |S| -- per-request base-model and sampling cost;
- ``batch_max_rank``: |S| * max rank -- BGMV pads every adapter to the max rank;
- ``sum_rank``: sum of ranks -- MBGMV, no padding;
- ``tokens``: sum of tokens -- decode: attention over the KV context;
  prefill: the per-token base-model cost;
- ``tokens_max_rank``: tokens * max rank -- BGMV LoRA over prefill tokens;
- ``token_rank``: sum of tokens_i * rank_i -- MBGMV LoRA over prefill tokens;
- ``tokens_sq``: sum of tokens_i ** 2 -- prefill attention, quadratic in the prompt;
- ``adapters``: distinct adapters -- per-adapter gather or segment cost.

Default term sets (``DEFAULT_TERMS``), the paper's models plus what real steps need:

- decode, bgmv:  ``a*|S|*max_rank + c*|S| + d*context + e*adapters + b`` (the kernels
  walk one segment per adapter on either backend; on the CPU profile the term lifts the
  held-out R^2 of bgmv decode from 0.956 to 0.971)
- decode, mbgmv: ``a*sum_rank + c*|S| + d*context + e*adapters + b``
- prefill, bgmv:  ``b + t*tokens + a*tokens*max_rank + q*tokens_sq``
- prefill, mbgmv: ``b + t*tokens + a*token_rank + q*tokens_sq``
- cold start (one request): ``b + a*rank + u*tokens*rank`` (a load grows with the
  rank; CPU-assisted LoRA with tokens * rank)

Fitting is least squares on all samples; R^2 is reported on held-out samples by
k-fold cross-validation (``fit_linear``). A term whose coefficient comes out negative
(``const`` included) is dropped and the fit repeated, so every cost grows with load and
no set costs less than nothing (routing relies on both).

Profile JSON schema (``caraserve.profile/1``)::

    {
      "schema": "caraserve.profile/1",
      "device": "cpu" | "cuda",         # torch device type
      "device_name": str,               # e.g. "NVIDIA H100 80GB HBM3", "AMD EPYC"
      "model": str,                     # model name or directory
      "model_digest": str,              # digest of the weights (identity check)
      "dtype": str, "backend": "bgmv" | "mbgmv",
      "created": iso8601 str,
      "synthetic": bool,                # optional: true for made-up profiles
      "cold_start_link": str,           # optional: how cold-start loads reached the device
                                        # (e.g. "EMULATED link: 16 GB/s, 0.5 ms per load")
      "grid": "full" | "quick",         # optional (default full): quick = a worker's start-up grid
      "decode":  {"terms": [str], "coef": [float], "r2_holdout": float,   # null: undefined
                  "r2_train": float, "n_train": int, "n_holdout": int,   # r2_holdout: k-fold CV
                  "dropped_terms": [str]},
      "prefill": {same keys},
      "cold_start": {"host": {same keys}, "disk": {...}},   # optional
      "cpu_prefill": {"tokens_per_core": int,       # optional (`caraserve profile --cpu-prefill`):
                      "rank": int, "tokens": int,    # c, the tokens one CPU core's LoRA delta covers
                      "layer_ms": float,             # within the device's per-layer prefill time,
                      "core_ms": float,              # measured at this rank and prompt length
                      "device_name": str},
      "samples": [ {"phase": "decode" | "prefill" | "cold_host" | "cold_disk",
                    "ranks": [int], "tokens": [int],        # one entry per request
                    "adapters": [str|null],                  # optional
                    "latency_us": float} ]
    }

Decode samples: one engine decode step over the listed requests, ``tokens`` being
each request's context length. Prefill samples: one prefill step, ``tokens`` being
prompt lengths. ``cold_host``/``cold_disk`` samples: the extra prefill latency of one
request whose adapter starts in host memory / on disk (the load, or the CPU-assisted
path hiding it). Without ``adapters`` each request with rank > 0 has its own adapter.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from shared.backends import BACKENDS
from shared.batch_stats import BatchStats, BatchStatsError
from shared.levels import LEVELS, Level

SCHEMA = "caraserve.profile/1"
GRIDS = ("full", "quick")
PHASES = ("decode", "prefill", "cold_host", "cold_disk")
COLD_LEVELS = (Level.HOST.value, Level.DISK.value)  # the levels a load starts from
TERMS = ("const", "requests", "batch_max_rank", "sum_rank", "tokens", "tokens_max_rank",
         "token_rank", "tokens_sq", "adapters")
DEFAULT_TERMS = {
    ("decode", "bgmv"): ("const", "requests", "batch_max_rank", "tokens", "adapters"),
    ("decode", "mbgmv"): ("const", "requests", "sum_rank", "tokens", "adapters"),
    ("prefill", "bgmv"): ("const", "tokens", "tokens_max_rank", "tokens_sq"),
    ("prefill", "mbgmv"): ("const", "tokens", "token_rank", "tokens_sq"),
    ("cold", "bgmv"): ("const", "sum_rank", "token_rank"),
    ("cold", "mbgmv"): ("const", "sum_rank", "token_rank"),
}


class ProfileError(ValueError):
    """A profile or its samples are malformed, or too few to fit."""


class ProfileMismatchError(ProfileError):
    """A profile was made for another model, device or backend than the one asked for."""


def features(n: int, sum_rank: int, max_rank: int, tokens: int, token_rank: int,
             tokens_sq: int, adapters: int) -> tuple[float, ...]:
    """The TERMS feature vector of a request set given by its sums (all zero when n == 0)."""
    if n == 0:
        return (0.0,) * len(TERMS)
    return (1.0, n, n * max_rank, sum_rank, tokens, tokens * max_rank, token_rank, tokens_sq, adapters)


def stats_features(s: BatchStats) -> tuple[float, ...]:
    return features(s.count, s.sum_rank, s.max_rank, s.sum_tokens, s.sum_token_rank,
                    s.sum_tokens_sq, s.adapters)


class LinearCost:
    """``cost(S) = sum_j coef_j * feature_j(S)`` in microseconds; 0 for an empty S.

    Coefficients of terms not in ``terms`` are zero. Evaluation takes a few
    microseconds and never loops over requests.
    """

    __slots__ = ("terms", "coef", "r2_holdout", "r2_train", "n_train", "n_holdout", "dropped_terms",
                 "_c")

    def __init__(self, terms: Sequence[str], coef: Sequence[float], r2_holdout: float = float("nan"),
                 r2_train: float = float("nan"), n_train: int = 0, n_holdout: int = 0,
                 dropped_terms: Sequence[str] = ()) -> None:
        unknown = [t for t in terms if t not in TERMS]
        if unknown:
            raise ProfileError(f"unknown perf-model terms {unknown}; known: {', '.join(TERMS)}")
        if len(terms) != len(coef) or len(set(terms)) != len(terms):
            raise ProfileError("terms and coef must be equally long and terms unique")
        if not all(math.isfinite(float(c)) for c in coef):
            raise ProfileError("perf-model coefficients must be finite")
        self.terms = tuple(terms)
        self.coef = tuple(float(c) for c in coef)
        self.r2_holdout, self.r2_train = float(r2_holdout), float(r2_train)
        self.n_train, self.n_holdout = int(n_train), int(n_holdout)
        self.dropped_terms = tuple(dropped_terms)
        full = dict.fromkeys(TERMS, 0.0)
        full.update(zip(self.terms, self.coef))
        self._c = tuple(full[t] for t in TERMS)

    @classmethod
    def from_mapping(cls, coefficients: Mapping[str, float]) -> "LinearCost":
        """A cost with the given {term: coefficient} (no fit statistics)."""
        return cls(list(coefficients), list(coefficients.values()))

    def coefficient(self, term: str) -> float:
        return self._c[TERMS.index(term)]

    def cost_of(self, n: int, sum_rank: int, max_rank: int, tokens: int, token_rank: int,
                tokens_sq: int, adapters: int) -> float:
        """Cost of a request set given by its sums."""
        if n == 0:
            return 0.0
        c0, c1, c2, c3, c4, c5, c6, c7, c8 = self._c
        return (c0 + c1 * n + c2 * n * max_rank + c3 * sum_rank + c4 * tokens
                + c5 * tokens * max_rank + c6 * token_rank + c7 * tokens_sq + c8 * adapters)

    def cost(self, s: BatchStats) -> float:
        """Cost of the set ``s``."""
        return self.cost_of(s.count, s.sum_rank, s.max_rank, s.sum_tokens, s.sum_token_rank,
                            s.sum_tokens_sq, s.adapters)

    def cost_with(self, s: BatchStats, rank: int, tokens: int, adapter: Hashable | None = None) -> float:
        """Cost of ``s`` plus one request (rank, tokens, adapter), without changing ``s``."""
        return self.cost_and_with(s, rank, tokens, adapter)[1]

    def cost_and_with(self, s: BatchStats, rank: int, tokens: int,
                      adapter: Hashable | None = None) -> tuple[float, float]:
        """(cost of ``s``, cost of ``s`` plus one request): the what-if in one pass."""
        c0, c1, c2, c3, c4, c5, c6, c7, c8 = self._c
        n, sr, m, st, stq = s.count, s.sum_rank, s.max_rank, s.sum_tokens, s.sum_tokens_sq
        str_, na = s.sum_token_rank, s.adapters
        before = 0.0 if n == 0 else (c0 + c1 * n + c2 * n * m + c3 * sr + c4 * st + c5 * st * m
                                     + c6 * str_ + c7 * stq + c8 * na)
        if adapter is not None and not s.has_adapter(adapter):
            na += 1
        if rank > m:
            m = rank
        n += 1
        st += tokens
        after = (c0 + c1 * n + c2 * n * m + c3 * (sr + rank) + c4 * st + c5 * st * m
                 + c6 * (str_ + tokens * rank) + c7 * (stq + tokens * tokens) + c8 * na)
        return before, after

    def padding(self, n: int, tokens: float, from_rank: int, to_rank: int) -> float:
        """Extra cost of ``n`` requests holding ``tokens`` when the set's max rank rises from
        ``from_rank`` to ``to_rank`` (the BGMV padding terms; 0 for a model without them)."""
        c2, c5 = self._c[2], self._c[5]
        return (c2 * n + c5 * tokens) * (to_rank - from_rank)

    def step_growth(self, s: BatchStats) -> tuple[float, float]:
        """(alpha, beta) with cost(s advanced by j tokens each) = cost(s) + alpha*j + beta*j^2."""
        if s.count == 0:
            return 0.0, 0.0
        _, _, _, _, c4, c5, c6, c7, _ = self._c
        n = s.count
        alpha = c4 * n + c5 * n * s.max_rank + c6 * s.sum_rank + c7 * 2 * s.sum_tokens
        return alpha, c7 * n

    def run_time(self, s: BatchStats, steps: int) -> float:
        """Total time of ``steps`` consecutive decode steps of ``s`` (each adds a token per request)."""
        if steps <= 0:
            return 0.0
        alpha, beta = self.step_growth(s)
        k = steps
        return k * self.cost(s) + alpha * k * (k - 1) / 2 + beta * (k - 1) * k * (2 * k - 1) / 6

    def steps_within(self, s: BatchStats, budget_us: float, max_steps: int) -> int:
        """Largest k <= max_steps with run_time(s, k) <= budget_us."""
        lo, hi = 0, max_steps
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.run_time(s, mid) <= budget_us:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def to_dict(self) -> dict[str, Any]:
        return {"terms": list(self.terms), "coef": list(self.coef), "r2_holdout": _json_float(self.r2_holdout),
                "r2_train": _json_float(self.r2_train), "n_train": self.n_train, "n_holdout": self.n_holdout,
                "dropped_terms": list(self.dropped_terms)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "LinearCost":
        if not isinstance(d, Mapping) or not isinstance(d.get("terms"), list) or not isinstance(d.get("coef"), list):
            raise ProfileError(f"{where}: needs 'terms' and 'coef' lists")
        try:
            return cls(d["terms"], [float(c) for c in d["coef"]], _from_json_float(d.get("r2_holdout")),
                       _from_json_float(d.get("r2_train")), int(d.get("n_train", 0)),
                       int(d.get("n_holdout", 0)), d.get("dropped_terms", ()))
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"{where}: {exc}") from exc

    def __repr__(self) -> str:
        body = ", ".join(f"{t}={c:.4g}" for t, c in zip(self.terms, self.coef))
        return f"LinearCost({body}; r2_holdout={self.r2_holdout:.3f})"


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _from_json_float(x: Any) -> float:
    return float("nan") if x is None else float(x)


def r2_score(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination; nan when y is constant."""
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    if ss_tot == 0.0:
        return float("nan")
    return 1.0 - float(np.sum((y - pred) ** 2)) / ss_tot


def _lstsq_nonneg(x: np.ndarray, y: np.ndarray, terms: list[str]) -> tuple[list[str], np.ndarray, list[str]]:
    """Least squares on column-scaled features, dropping negative terms (``const`` too) one at a time."""
    keep, dropped = list(terms), []
    while True:
        if not keep:
            raise ProfileError(f"no term of {list(terms)} fits with a non-negative coefficient")
        cols = [TERMS.index(t) for t in keep]
        a = x[:, cols]
        scale = np.abs(a).max(axis=0)
        scale[scale == 0] = 1.0
        coef = np.linalg.lstsq(a / scale, y, rcond=None)[0] / scale
        negative = [(c, t) for c, t in zip(coef, keep) if c < 0]
        if not negative:
            return keep, coef, dropped
        worst = min(negative)[1]
        keep.remove(worst)
        dropped.append(worst)


def fit_linear(stats: Sequence[BatchStats], latency_us: Sequence[float], terms: Sequence[str],
               holdout_fraction: float = 0.25, seed: int = 0) -> LinearCost:
    """Fit ``terms`` to (stats, latency) pairs; R^2 on held-out samples by k-fold cross-validation.

    The samples are split (seeded) into ``k = round(1 / holdout_fraction)`` folds; each fold
    is predicted by the fit on the other folds, so every sample is held out exactly once, and
    ``r2_holdout`` is the R^2 of those out-of-fold predictions. A single split of a few dozen
    samples would let one unlucky fold decide the figure. The coefficients are the fit on
    all samples.
    """
    n = len(stats)
    if n != len(latency_us):
        raise ProfileError("stats and latencies must have the same length")
    if not 0.0 < holdout_fraction < 1.0:
        raise ProfileError("holdout_fraction must be in (0, 1)")
    folds = max(2, int(round(1.0 / holdout_fraction)))
    n_hold = -(-n // folds)  # the largest fold
    if n - n_hold < len(terms) + 1:
        raise ProfileError(f"{n} samples are too few to fit {len(terms)} terms with {folds}-fold cross-validation")
    x = np.array([stats_features(s) for s in stats], dtype=np.float64)
    y = np.asarray(latency_us, dtype=np.float64)
    out_of_fold = np.empty(n)
    for hold in np.array_split(np.random.default_rng(seed).permutation(n), folds):
        train = np.setdiff1d(np.arange(n), hold)
        keep, coef, _ = _lstsq_nonneg(x[train], y[train], list(terms))
        out_of_fold[hold] = x[hold][:, [TERMS.index(t) for t in keep]] @ coef
    keep, coef, dropped = _lstsq_nonneg(x, y, list(terms))
    r2_train = r2_score(y, x[:, [TERMS.index(t) for t in keep]] @ coef)
    return LinearCost(keep, coef.tolist(), r2_score(y, out_of_fold), r2_train, n, n, dropped)


def sample_stats(sample: Mapping[str, Any], where: str = "sample") -> BatchStats:
    """The BatchStats of one profile sample (see the module docstring)."""
    ranks = sample.get("ranks")
    if not isinstance(ranks, list) or not ranks:
        raise ProfileError(f"{where}: 'ranks' must be a non-empty list")
    tokens = sample.get("tokens", [0] * len(ranks))
    adapters = sample.get("adapters")
    if adapters is None:
        adapters = [f"adapter{i}" if int(r) > 0 else None for i, r in enumerate(ranks)]
    try:
        return BatchStats.from_requests([int(r) for r in ranks], [int(t) for t in tokens], adapters)
    except (BatchStatsError, TypeError, ValueError) as exc:
        raise ProfileError(f"{where}: {exc}") from exc


def sample_latency(sample: Mapping[str, Any], where: str = "sample") -> float:
    try:
        latency = float(sample["latency_us"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"{where}: needs a numeric 'latency_us'") from exc
    if not math.isfinite(latency) or latency < 0:
        raise ProfileError(f"{where}: latency_us must be finite and >= 0, got {latency!r}")
    return latency


@dataclass(frozen=True)
class ProfileInfo:
    """Where and for what a profile was taken."""

    backend: str
    device: str = "cpu"
    device_name: str = ""
    model: str = ""
    model_digest: str = ""
    dtype: str = ""
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    synthetic: bool = False
    cold_start_link: str = ""  # how the cold-start samples' loads reached the device
    grid: str = "full"  # "quick": a worker's start-up grid, superseded by a full `caraserve profile`

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ProfileError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.grid not in GRIDS:
            raise ProfileError(f"grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")


CPU_PREFILL_INTS = ("tokens_per_core", "rank", "tokens")
CPU_PREFILL_MS = ("layer_ms", "core_ms")


@dataclass(frozen=True)
class CpuPrefillProfile:
    """How CPU-assisted prefill splits its work: c, the tokens one CPU core handles.

    ``core_ms`` is one core computing the LoRA deltas ``(x @ A) @ B`` of every projection of
    one layer for ``tokens`` tokens at ``rank``; ``layer_ms`` is the device's prefill time
    per layer for as many tokens; so ``tokens_per_core = max(1, floor(tokens * layer_ms /
    core_ms))`` keeps a core within the device's pace, and a prefill of T tokens takes
    ``ceil(T / tokens_per_core)`` CPU workers.
    """

    tokens_per_core: int
    rank: int
    tokens: int
    layer_ms: float
    core_ms: float
    device_name: str = ""

    def __post_init__(self) -> None:
        counts = {"tokens_per_core": self.tokens_per_core, "rank": self.rank, "tokens": self.tokens}
        for key, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ProfileError(f"cpu_prefill.{key} must be an integer >= 1, got {value!r}")
        for key, value in {"layer_ms": self.layer_ms, "core_ms": self.core_ms}.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value > 0):
                raise ProfileError(f"cpu_prefill.{key} must be a finite number > 0, got {value!r}")
        if not isinstance(self.device_name, str):
            raise ProfileError("cpu_prefill.device_name must be a string")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "cpu_prefill") -> "CpuPrefillProfile":
        if not isinstance(d, Mapping):
            raise ProfileError(f"{where}: must be an object")
        missing = [k for k in (*CPU_PREFILL_INTS, *CPU_PREFILL_MS) if k not in d]
        if missing:
            raise ProfileError(f"{where}: missing {', '.join(missing)}")
        try:
            return cls(**{k: d[k] for k in CPU_PREFILL_INTS}, **{k: float(d[k]) for k in CPU_PREFILL_MS},
                       device_name=d.get("device_name", ""))
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"{where}: {exc}") from exc


class PerfModel:
    """Decode, prefill and cold-start costs of one backend on one device and model, and (optionally)
    the CPU-assisted prefill's tokens per core."""

    def __init__(self, info: ProfileInfo, decode: LinearCost, prefill: LinearCost,
                 cold_start: Mapping[str, LinearCost] | None = None,
                 samples: Sequence[Mapping[str, Any]] = (),
                 cpu_prefill: CpuPrefillProfile | None = None) -> None:
        self.info = info
        self.decode = decode
        self.prefill = prefill
        self.cold_start = dict(cold_start or {})
        bad = [lvl for lvl in self.cold_start if lvl not in COLD_LEVELS]
        if bad:
            raise ProfileError(f"cold_start levels must be host or disk, got {bad}")
        self.samples = list(samples)
        self.cpu_prefill = cpu_prefill

    def with_cpu_prefill(self, cpu_prefill: CpuPrefillProfile | None) -> "PerfModel":
        """This profile with its cpu_prefill section added or replaced (None: removed)."""
        return PerfModel(self.info, self.decode, self.prefill, self.cold_start, self.samples, cpu_prefill)

    @property
    def backend(self) -> str:
        return self.info.backend

    # ---- evaluation (microseconds) -------------------------------------------------
    def decode_us(self, s: BatchStats) -> float:
        """One decode step of the running set ``s`` (tokens = context lengths)."""
        return self.decode.cost(s)

    def decode_us_with(self, s: BatchStats, rank: int, tokens: int, adapter: Hashable | None = None) -> float:
        """One decode step of ``s`` plus a request (what-if; ``s`` unchanged)."""
        return self.decode.cost_with(s, rank, tokens, adapter)

    def prefill_us(self, s: BatchStats) -> float:
        """One prefill step of the set ``s`` (tokens = prompt lengths)."""
        return self.prefill.cost(s)

    def prefill_us_with(self, s: BatchStats, rank: int, tokens: int, adapter: Hashable | None = None) -> float:
        return self.prefill.cost_with(s, rank, tokens, adapter)

    def cold_start_us(self, rank: int, tokens: int, level: str) -> float:
        """Extra prefill latency of one request whose adapter sits at ``level`` (0 on device).

        A profile without cold-start data for ``level`` counts the load as free.
        """
        if level == Level.DEVICE:
            return 0.0
        cost = self.cold_start.get(level)
        if cost is None:
            if level not in LEVELS:
                raise ProfileError(f"residency level must be one of {LEVELS}, got {level!r}")
            return 0.0
        return cost.cost_of(1, rank, rank, tokens, tokens * rank, tokens * tokens, 1)

    def cold_us(self, rank: int, tokens: int, level: str, assist_cores: int = 0) -> float:
        """Extra prefill latency of one request whose adapter sits at ``level`` on a worker whose
        CPU-assisted prefill pool has ``assist_cores`` healthy cores (0: no pool).

        A host-level adapter on an assisting worker is priced as assisted (:meth:`assisted_us`,
        when this profile has a cpu_prefill section), otherwise as the load it waits for; a
        disk-level adapter waits for its host copy either way.
        """
        if level == Level.HOST and assist_cores > 0 and self.cpu_prefill is not None:
            return self.assisted_us(rank, tokens, assist_cores)
        return self.cold_start_us(rank, tokens, level)

    def assisted_us(self, rank: int, tokens: int, cores: int) -> float:
        """Extra prefill latency of a CPU-assisted cold start, from the cpu_prefill section.

        The pool splits the ``tokens`` over ``k = min(cores, ceil(tokens / c))`` cores; per
        layer a core then takes ``core_ms * ceil(tokens / k) / t0 * rank / r0`` against the
        device's ``layer_ms * tokens / t0`` (``t0``, ``r0``: the measured point). The prefill
        is stretched by the CPU's excess over the device, so the extra time is the request's
        solo prefill times ``max(0, cpu / device - 1)``; 0 while the pool keeps pace.
        """
        cpu = self.cpu_prefill
        if cpu is None or cores < 1 or tokens < 1:
            raise ProfileError("assisted_us needs a cpu_prefill section, cores >= 1 and tokens >= 1")
        k = min(cores, -(-tokens // cpu.tokens_per_core))
        core_layer = cpu.core_ms * -(-tokens // k) / cpu.tokens * rank / cpu.rank
        device_layer = cpu.layer_ms * tokens / cpu.tokens
        excess = max(0.0, core_layer / device_layer - 1.0)
        return excess * self.prefill.cost_of(1, rank, rank, tokens, tokens * rank, tokens * tokens, 1)

    def no_lora_tpt_us(self, batch: int, prompt_tokens: float, output_tokens: float) -> float:
        """Steady-state time per output token of the base model (rank 0) at a full ``batch``.

        Each decode step makes ``batch`` tokens; one request in ``output_tokens``
        finishes per token made and is replaced by one prefill, so a request sees
        ``(output-1) * (D + batch/output * P) + P`` over ``output`` tokens, D being
        the decode step at mean context ``prompt + (output-1)/2`` and P one prefill.
        """
        if batch < 1 or prompt_tokens < 0 or output_tokens < 1:
            raise ProfileError("no_lora_tpt_us needs batch >= 1, prompt >= 0, output >= 1")
        ctx = prompt_tokens + (output_tokens - 1) / 2
        d = self.decode.cost_of(batch, 0, 0, batch * ctx, 0, batch * ctx * ctx, 0)
        p = self.prefill.cost_of(1, 0, 0, prompt_tokens, 0, prompt_tokens * prompt_tokens, 0)
        life = (output_tokens - 1) * (d + batch / output_tokens * p) + p
        return life / output_tokens

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def from_coefficients(cls, backend: str, decode: Mapping[str, float], prefill: Mapping[str, float],
                          cold_start: Mapping[str, Mapping[str, float]] | None = None,
                          **info: Any) -> "PerfModel":
        """A model with given {term: coefficient} maps (tests, what-if studies)."""
        cold = {lvl: LinearCost.from_mapping(c) for lvl, c in (cold_start or {}).items()}
        return cls(ProfileInfo(backend=backend, **info), LinearCost.from_mapping(decode),
                   LinearCost.from_mapping(prefill), cold)

    @classmethod
    def fit(cls, samples: Sequence[Mapping[str, Any]], info: ProfileInfo,
            terms: Mapping[str, Sequence[str]] | None = None, holdout_fraction: float = 0.25,
            seed: int = 0) -> "PerfModel":
        """Fit decode, prefill and (if sampled) cold-start costs; ``terms`` overrides per phase.

        ``terms`` keys: "decode", "prefill", "cold" (defaults: ``DEFAULT_TERMS``).
        """
        terms = dict(terms or {})
        by_phase: dict[str, tuple[list[BatchStats], list[float]]] = {p: ([], []) for p in PHASES}
        for i, sample in enumerate(samples):
            phase = sample.get("phase") if isinstance(sample, Mapping) else None
            if phase not in PHASES:
                raise ProfileError(f"sample {i}: phase must be one of {', '.join(PHASES)}, got {phase!r}")
            by_phase[phase][0].append(sample_stats(sample, f"sample {i}"))
            by_phase[phase][1].append(sample_latency(sample, f"sample {i}"))

        def fit_phase(phase: str, kind: str) -> LinearCost:
            stats, lat = by_phase[phase]
            chosen = terms.get(kind, DEFAULT_TERMS[(kind, info.backend)])
            try:
                return fit_linear(stats, lat, chosen, holdout_fraction, seed)
            except ProfileError as exc:
                raise ProfileError(f"{phase} samples: {exc}") from exc

        cold = {lvl: fit_phase(f"cold_{lvl}", "cold") for lvl in COLD_LEVELS if by_phase[f"cold_{lvl}"][0]}
        return cls(info, fit_phase("decode", "decode"), fit_phase("prefill", "prefill"), cold, samples)

    # ---- profile files ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema": SCHEMA}
        d.update(asdict(self.info))
        d["decode"] = self.decode.to_dict()
        d["prefill"] = self.prefill.to_dict()
        if self.cold_start:
            d["cold_start"] = {lvl: c.to_dict() for lvl, c in self.cold_start.items()}
        if self.cpu_prefill is not None:
            d["cpu_prefill"] = self.cpu_prefill.to_dict()
        d["samples"] = self.samples
        return d

    def save(self, path: str | os.PathLike) -> None:
        """Write the profile JSON atomically."""
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(self.to_text())
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "profile") -> "PerfModel":
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            got = d.get("schema") if isinstance(d, Mapping) else type(d).__name__
            raise ProfileError(f"{where}: not a {SCHEMA} profile (schema {got!r})")
        info_keys = ("backend", "device", "device_name", "model", "model_digest", "dtype", "created")
        for key in info_keys:
            if not isinstance(d.get(key), str):
                raise ProfileError(f"{where}: field {key!r} must be a string")
        link = d.get("cold_start_link", "")
        if not isinstance(link, str):
            raise ProfileError(f"{where}: field 'cold_start_link' must be a string")
        grid = d.get("grid", "full")
        if not isinstance(grid, str):
            raise ProfileError(f"{where}: field 'grid' must be a string")
        info = ProfileInfo(**{k: d[k] for k in info_keys}, synthetic=bool(d.get("synthetic", False)),
                           cold_start_link=link, grid=grid)
        cold_raw = d.get("cold_start") or {}
        if not isinstance(cold_raw, Mapping):
            raise ProfileError(f"{where}: cold_start must be an object")
        cold = {lvl: LinearCost.from_dict(c, f"{where}: cold_start.{lvl}") for lvl, c in cold_raw.items()}
        samples = d.get("samples", [])
        if not isinstance(samples, list):
            raise ProfileError(f"{where}: samples must be a list")
        cpu_raw = d.get("cpu_prefill")
        cpu = None if cpu_raw is None else CpuPrefillProfile.from_dict(cpu_raw, f"{where}: cpu_prefill")
        return cls(info, LinearCost.from_dict(d.get("decode"), f"{where}: decode"),
                   LinearCost.from_dict(d.get("prefill"), f"{where}: prefill"), cold, samples, cpu)

    @classmethod
    def from_text(cls, text: str, where: str = "profile") -> "PerfModel":
        """Parse a profile's JSON text."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{where}: invalid JSON ({exc})") from exc
        return cls.from_dict(raw, where)

    def to_text(self) -> str:
        """The profile's JSON text, as :meth:`save` writes it."""
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike, expect_model: str | None = None, expect_device: str | None = None,
             expect_model_digest: str | None = None, expect_backend: str | None = None) -> "PerfModel":
        """Read a profile; refuse one made for another model, device (``device_name``) or backend."""
        where = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ProfileError(f"cannot read profile {where}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ProfileError(f"{where}: not UTF-8 text ({exc.reason})") from exc
        model = cls.from_text(text, where)
        model.check(expect_model, expect_device, expect_model_digest, expect_backend, where)
        return model

    def check(self, expect_model: str | None = None, expect_device: str | None = None,
              expect_model_digest: str | None = None, expect_backend: str | None = None,
              where: str = "profile", expect_dtype: str | None = None) -> None:
        """Raise :class:`ProfileMismatchError` unless the profile matches every given expectation."""
        wanted = (("model", expect_model, self.info.model), ("device", expect_device, self.info.device_name),
                  ("model digest", expect_model_digest, self.info.model_digest),
                  ("backend", expect_backend, self.info.backend), ("dtype", expect_dtype, self.info.dtype))
        for what, expect, have in wanted:
            if expect is not None and expect != have:
                raise ProfileMismatchError(
                    f"{where} was made for {what} {have!r}, not {expect!r}; re-run `caraserve profile` here")


def current_device_name(device: str) -> str:
    """The identity a profile's ``device_name`` is compared with: GPU name or CPU model."""
    if device.startswith("cuda"):
        import torch

        return str(torch.cuda.get_device_name(torch.device(device)))
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()

