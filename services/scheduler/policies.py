"""Routing policies: pick the worker a request goes to.

Call signature (the scheduler service, the simulator and the tests all use it)::

    policy = make_policy(PolicyConfig(policy="rank_aware"), perf_model, slo_us)
    decision = policy.choose(workers, request)   # workers: Sequence[WorkerView]
    # decision is a worker_id (str), or NoCapacity(reason) when none can take it

``choose`` does not change the views; the caller records the routed request with
``view.add_waiting(...)`` so the next decision counts it. Policies:

- ``rank_aware`` (default): Algorithm 1 of the paper. For each worker, with
  ``exists`` = its running + waiting requests and ``queue`` = its waiting ones::

      d_prefill = Pre(queue + req) - Pre(queue) + cold_start(req's adapter residency)
      d_decode  = Dec(exists + req) - Dec(exists) + padding_extension
      cost      = d_prefill / avg_response_len + d_decode
      total     = cost * |exists|               (an idle worker scores 0 and wins)
                  + slot_wait / avg_response_len   (full workers only)

  A worker is SLO-infeasible when the predicted time per token of its requests after
  taking this one exceeds the SLO; ``slo_penalty`` = False turns the check off. It is
  full when the batch (or the KV cache, when reported) has no room. The request goes
  to the feasible worker with the least total; if none is feasible (the SLO cannot be
  kept anywhere), to the worker with room and the least total; if all are full, to
  the full worker with the least total (``queue_delay``) or the least loaded one.
  Among equal totals (e.g. several idle workers) the lower predicted time per token
  wins.

  ``Pre``, ``Dec`` and ``cold_start`` are the worker's own model (the profile it published,
  ``WorkerView.perf``), so unlike devices are priced each by its own costs; the paper assumes
  one profile for all servers. A cold adapter is priced by how that worker would serve it
  (``PerfModel.cold_us``): assisted by its CPU prefill pool (small), waiting for the load
  from host memory, or from disk. A worker whose profile is pending is priced with the
  reference model (the scheduler's ``--profile``), else with the fastest candidate's; with
  no model at all the request goes to the least loaded worker.

  Terms the paper's model leaves out (each documented in ``PolicyConfig``):

  - predicted time per token = ``Dec(exists + req)`` plus, with ``prefill_in_slo``,
    the prefill stalls a request there sees per token: the newcomer's own prefill and
    one typical prefill (``reference_prompt_tokens``) for each request already there
    (each is replaced by a new one about once per ``avg_response_len`` tokens), i.e.
    ``(|exists| * Pre(typical) + Pre(req)) / avg_response_len``; plus ``slot_wait /
    avg_response_len`` on a full worker;
  - ``queue_delay``: when every worker is full, the choice among them keeps Algorithm
    1's total instead of falling back to the least loaded one (which mixes ranks
    exactly when capacity is scarcest), plus the newcomer's wait for a slot, spread
    over its tokens: it waits until ``ahead = |exists| + 1 - max_batch`` (at least
    1) requests have left, and each step ends about ``|exists| / avg_response_len``
    of them, so ``slot_wait = ahead * avg_response_len * Dec(exists) / |exists|``;
  - ``padding_lifetime`` (BGMV; zero for a model without padding terms): a request that
    does not raise the max rank still keeps the batch padded to its rank after the
    higher-or-equal ranks leave. With ``j`` requests of rank >= its rank (memoryless
    lifetimes: it outlives them all with probability ``1 / (j + 1)``) and ``below``
    the largest rank under its own, the expected padding it adds to each step is
    ``padding(|exists| - j requests, below -> rank) / (j + 1)``. Algorithm 1 counts the
    padding of a request that raises the max rank (in ``d_decode``) but not this.
- ``random``: uniform over the workers (seeded).
- ``round_robin``: the workers in turn.
- ``least_loaded`` (MostIdle): fewest running + waiting requests.
- ``first_fit`` (Punica): the first worker, in the given order, with fewer than
  max_batch requests; the least loaded one when all are full.
- ``adapter_affinity``: the least loaded worker holding the adapter on its device
  unless that worker is overloaded (load >= affinity_overload * max_batch); otherwise
  the least loaded worker overall.

Every policy answers ``NoCapacity`` when there is no candidate, or when
``max_waiting`` > 0 and every worker already has that many requests waiting.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from services.scheduler.worker_view import WorkerView
from shared.config import check_choice, option, require
from shared.levels import Level
from shared.perf_model import PerfModel

POLICY_NAMES = ("rank_aware", "random", "round_robin", "least_loaded", "first_fit", "adapter_affinity")
SLO_FACTOR = 1.5


class PolicyError(ValueError):
    """A policy cannot be built as asked (unknown name, missing perf model or SLO)."""


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """What a policy knows about the request being routed (the scheduler derives it from the
    wire ``shared.schemas.RouteRequest``; the simulator from its workload)."""

    rank: int  # LoRA rank of its adapter, 0 for the base model
    prompt_tokens: int
    adapter: Hashable | None = None


@dataclass(frozen=True, slots=True)
class NoCapacity:
    """No worker can take the request now; ``reason`` says why."""

    reason: str


@dataclass
class PolicyConfig:
    """How requests are routed to workers."""

    policy: str = option("rank_aware", "routing policy", POLICY_NAMES)
    slo_ms: float = option(0.0, "time-per-token SLO in ms; 0 derives 1.5x the profile's no-LoRA time per token")
    avg_response_len: float = option(128.0, "expected output tokens per request (rank_aware's prefill amortisation)")
    reference_batch: int = option(32, "batch size at which the default SLO's no-LoRA time per token is taken")
    reference_prompt_tokens: float = option(
        128.0, "typical prompt tokens: the default SLO's, and rank_aware's typical prefill stall")
    slo_penalty: bool = option(True, "rank_aware: avoid workers whose predicted time per token would exceed the SLO")
    prefill_in_slo: bool = option(
        True, "rank_aware: predicted time per token counts the newcomer's prefill and one typical prefill per "
              "request there, each spread over avg_response_len tokens")
    queue_delay: bool = option(
        True, "rank_aware: when every worker is full, pick by Algorithm 1's total plus the newcomer's expected "
              "wait for a slot (ahead x avg_response_len x step / batch) per token; off: the least loaded one")
    padding_lifetime: bool = option(
        True, "rank_aware (BGMV): charge a request that does not raise the max rank the padding it is expected "
              "to keep after the higher ranks leave (padding of the lower-rank requests / (requests at or above + 1))")
    affinity_overload: float = option(1.0, "adapter_affinity: a worker is overloaded at this fraction of max batch")
    max_waiting: int = option(0, "answer no-capacity when every worker has this many waiting requests; 0: never")
    seed: int = option(0, "seed of the random policy")

    def __post_init__(self) -> None:
        check_choice("policy", self.policy, POLICY_NAMES)
        require(self.slo_ms >= 0, "slo_ms must be >= 0")
        require(self.avg_response_len >= 1, "avg_response_len must be >= 1")
        require(self.reference_batch >= 1, "reference_batch must be >= 1")
        require(self.reference_prompt_tokens >= 0, "reference_prompt_tokens must be >= 0")
        require(self.affinity_overload > 0, "affinity_overload must be > 0")
        require(self.max_waiting >= 0, "max_waiting must be >= 0")


def default_slo_us(perf: PerfModel, max_batch: int, prompt_tokens: float, output_tokens: float) -> float:
    """The default SLO: SLO_FACTOR x the base model's time per token at a full batch."""
    return SLO_FACTOR * perf.no_lora_tpt_us(max_batch, prompt_tokens, output_tokens)


class Policy(ABC):
    """A routing policy; see the module docstring for the contract of ``choose``."""

    name: ClassVar[str]

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    def choose(self, workers: Sequence[WorkerView], request: PolicyRequest) -> str | NoCapacity:
        """The worker_id to route ``request`` to, or NoCapacity."""
        if not workers:
            return NoCapacity("no candidate workers")
        limit = self.config.max_waiting
        if limit and all(w.waiting.count >= limit for w in workers):
            return NoCapacity(f"every worker has {limit} or more requests waiting")
        return workers[self.pick(workers, request)].worker_id

    @abstractmethod
    def pick(self, workers: Sequence[WorkerView], request: PolicyRequest) -> int:
        """Index into the non-empty ``workers`` of the chosen one."""


def _least_loaded(workers: Sequence[WorkerView]) -> int:
    best, best_load = 0, workers[0].total.count
    for i in range(1, len(workers)):
        load = workers[i].total.count
        if load < best_load:
            best, best_load = i, load
    return best


class RankAware(Policy):
    """Algorithm 1 with the SLO penalty, cold-start costs and the added terms (module docstring).

    Each worker is priced with its own performance model (``WorkerView.perf``, the profile
    its worker published); a worker without one (its profile is pending) is priced with the
    reference model ``perf``, else with the fastest model among the candidates. With no
    model at all, the request goes to the least loaded worker.
    """

    name = "rank_aware"

    def __init__(self, config: PolicyConfig, perf: PerfModel | None, slo_us: float | None) -> None:
        super().__init__(config)
        if slo_us is not None and slo_us <= 0:
            raise PolicyError(f"rank_aware needs a positive SLO, got {slo_us!r} us")
        self.perf = perf  # the reference model (the scheduler's --profile), or None
        self.slo_us = slo_us  # None: derived per decision from the models (see _slo)
        self._inv_len = 1.0 / config.avg_response_len
        self._default_slo: dict[PerfModel, float] = {}  # per model, computed once

    def pick(self, workers: Sequence[WorkerView], request: PolicyRequest) -> int:
        models = [view.perf or self.perf for view in workers]
        fallback = self.perf
        if fallback is None and (self.slo_us is None or None in models):
            known = [m for m in models if m is not None]
            if not known:
                return _least_loaded(workers)
            fallback = min(known, key=self._model_slo)
        slo = self._slo(fallback) if self.config.slo_penalty else float("inf")
        prefills: dict[PerfModel, tuple[float, float]] = {}
        # the best worker (least total, then least predicted time per token) among the
        # feasible ones with room [0], all with room [1] and the full ones [2]
        best = [[-1, float("inf"), float("inf")] for _ in range(3)]
        full, full_load = -1, 1 << 62
        queue_delay = self.config.queue_delay
        for i, view in enumerate(workers):
            room = view.has_room(request.prompt_tokens)
            if not room and not queue_delay:
                if view.total.count < full_load:
                    full, full_load = i, view.total.count
                continue
            perf = models[i] or fallback
            if perf not in prefills:
                prefills[perf] = self._prefills(perf, request)
            total, predicted = self._score(perf, view, request, *prefills[perf], room)
            tiers = ((best[0], best[1]) if predicted <= slo else (best[1],)) if room else (best[2],)
            for tier in tiers:
                tie = 1e-6 * (1.0 + tier[1]) if tier[0] >= 0 else 0.0  # rounding noise of after - before
                if total < tier[1] - tie or total <= tier[1] + tie and predicted < tier[2]:
                    tier[0], tier[1], tier[2] = i, total, predicted
        for choice in (best[0][0], best[1][0], best[2][0], full):
            if choice >= 0:
                return choice
        return 0

    def _slo(self, fallback: PerfModel | None) -> float:
        """The SLO in us: the explicit one, else the default of ``fallback`` (the reference model,
        else the fastest candidate model)."""
        if self.slo_us is not None:
            return self.slo_us
        assert fallback is not None
        return self._model_slo(fallback)

    def _model_slo(self, perf: PerfModel) -> float:
        """:func:`default_slo_us` of ``perf`` at the config's reference point (cached)."""
        slo = self._default_slo.get(perf)
        if slo is None:
            config = self.config
            slo = self._default_slo[perf] = default_slo_us(perf, config.reference_batch,
                                                           config.reference_prompt_tokens, config.avg_response_len)
        return slo

    def _prefills(self, perf: PerfModel, request: PolicyRequest) -> tuple[float, float]:
        """(the newcomer's solo prefill, a typical request's prefill at its rank) on ``perf``, in us."""
        rank, tokens, adapter = request.rank, request.prompt_tokens, request.adapter
        pre, typical = perf.prefill, self.config.reference_prompt_tokens
        own = pre.cost_of(1, rank, rank, tokens, tokens * rank, tokens * tokens, 0 if adapter is None else 1)
        return own, pre.cost_of(1, rank, rank, typical, typical * rank, typical * typical, 1)

    def _score(self, perf: PerfModel, view: WorkerView, request: PolicyRequest, own: float, typical: float,
               room: bool) -> tuple[float, float]:
        """(Algorithm 1's total plus the added terms, predicted time per token) on ``view``."""
        config, inv_len = self.config, self._inv_len
        rank, tokens, adapter = request.rank, request.prompt_tokens, request.adapter
        dec, exists = perf.decode, view.total
        n = exists.count
        before, after = dec.cost_and_with(exists, rank, tokens, adapter)
        d_decode = after - before
        if config.padding_lifetime and n and rank <= exists.max_rank and dec.padding(1, 1, 0, 1) > 0:
            at_least, below = exists.rank_split(rank)
            if at_least < n:  # the padding extension (module docstring); models without padding terms skip it
                lower = n - at_least
                d_decode += dec.padding(lower, exists.sum_tokens * lower / n, below, rank) / (at_least + 1)
        queue = view.waiting
        if queue.count:
            queued, with_req = perf.prefill.cost_and_with(queue, rank, tokens, adapter)
            d_prefill = with_req - queued
        else:
            d_prefill = own
        if adapter is not None and adapter not in view.resident:
            d_prefill += perf.cold_us(rank, tokens, view.residency(adapter), view.assist_cores)
        wait = 0.0 if room else self._slot_wait(view, before) * inv_len
        stalls = (n * typical + own) * inv_len if config.prefill_in_slo else 0.0
        return (d_prefill * inv_len + d_decode) * n + wait, after + stalls + wait

    def _slot_wait(self, view: WorkerView, step_us: float) -> float:
        """Expected wait (us) of a request on a full worker until a slot frees for it."""
        n = view.total.count
        if n == 0:
            return float("inf")
        ahead = max(1, n + 1 - view.max_batch)
        return ahead * self.config.avg_response_len * step_us / n


class RandomPolicy(Policy):
    name = "random"

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        self._rng = random.Random(config.seed)

    def pick(self, workers: Sequence[WorkerView], request: PolicyRequest) -> int:
        return self._rng.randrange(len(workers))


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__(config)
        self._next = 0

    def pick(self, workers: Sequence[WorkerView], request: PolicyRequest) -> int:
        i = self._next % len(workers)
        self._next = i + 1
        return i


class LeastLoaded(Policy):
    name = "least_loaded"

    def pick(self, workers: Sequence[WorkerView], request: PolicyRequest) -> int:
        return _least_loaded(workers)


class FirstFit(Policy):
    name = "first_fit"

    def pick(self, workers: Sequence[WorkerView], request: PolicyRequest) -> int:
        for i, view in enumerate(workers):
            if view.total.count < view.max_batch:
                return i
        return _least_loaded(workers)


class AdapterAffinity(Policy):
    name = "adapter_affinity"

    def pick(self, workers: Sequence[WorkerView], request: PolicyRequest) -> int:
        adapter, factor = request.adapter, self.config.affinity_overload
        best, best_load = -1, 1 << 62
        if adapter is not None:
            for i, view in enumerate(workers):
                load = view.total.count
                if load < best_load and load < factor * view.max_batch and view.residency(adapter) == Level.DEVICE:
                    best, best_load = i, load
        return best if best >= 0 else _least_loaded(workers)


_SIMPLE = {cls.name: cls for cls in (RandomPolicy, RoundRobin, LeastLoaded, FirstFit, AdapterAffinity)}


def make_policy(config: PolicyConfig, perf: PerfModel | None = None, slo_us: float | None = None) -> Policy:
    """Build the policy ``config.policy``.

    rank_aware prices each worker with its own model (``WorkerView.perf``) and uses ``perf``
    as the reference for workers without one. Its SLO: ``slo_us`` if given, else
    ``config.slo_ms``, else :func:`default_slo_us` of the reference model (or, without one,
    of the fastest worker model) at ``reference_batch``, ``reference_prompt_tokens`` and
    ``avg_response_len``.
    """
    if config.policy in _SIMPLE:
        return _SIMPLE[config.policy](config)
    if slo_us is None and config.slo_ms > 0:
        slo_us = config.slo_ms * 1000.0
    if slo_us is None and perf is not None:
        slo_us = default_slo_us(perf, config.reference_batch, config.reference_prompt_tokens,
                                config.avg_response_len)
    return RankAware(config, perf, slo_us)
