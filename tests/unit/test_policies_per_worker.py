"""rank_aware prices each worker with its own performance model (``WorkerView.perf``), with the
documented fallbacks for a worker whose profile is pending."""

from __future__ import annotations

from bench.routing.sched_sweep_hetero import scale_rank_terms
from services.scheduler.policies import PolicyConfig, PolicyRequest, make_policy
from services.scheduler.worker_view import WorkerView
from shared.perf_model import PerfModel

NO_SLO_US = 1e12  # isolates Algorithm 1's totals from the SLO tiers
L = 128.0  # avg_response_len
FAST = PerfModel.from_coefficients(
    "mbgmv", decode={"const": 20_000.0, "requests": 800.0, "sum_rank": 40.0, "tokens": 5.0},
    prefill={"const": 30_000.0, "tokens": 600.0, "token_rank": 8.0}, model_digest="0123456789abcdef")
SLOW = scale_rank_terms(FAST, 3.0)  # the same device, 3x slower per rank
SLOW_BASE = PerfModel.from_coefficients(  # a slower base model (a higher default SLO), same rank costs
    "mbgmv", decode={"const": 40_000.0, "requests": 1_600.0, "sum_rank": 40.0, "tokens": 5.0},
    prefill={"const": 60_000.0, "tokens": 1_200.0, "token_rank": 8.0}, model_digest="0123456789abcdef")


def _view(worker_id: str, perf: PerfModel | None, load: int, rank: int = 8) -> WorkerView:
    """A worker running ``load`` requests of ``rank`` (100-token contexts, adapter "lo")."""
    view = WorkerView(worker_id, 32, resident={"hi", "lo"}, host={"hi", "lo"}, perf=perf)
    for _ in range(load):
        view.add_waiting(rank, 100, "lo")
        view.admit(rank, 100, "lo")
    return view


def _algorithm1_total(perf: PerfModel, view: WorkerView, request: PolicyRequest) -> float:
    """The paper's total on ``view`` predicted from ``perf``: (own prefill / L + decode increment) * |exists|
    (mbgmv has no padding term; nothing is queued or cold here)."""
    before, after = perf.decode.cost_and_with(view.total, request.rank, request.prompt_tokens, request.adapter)
    one = _view("probe", perf, 0)
    one.add_waiting(request.rank, request.prompt_tokens, request.adapter)
    return (perf.prefill_us(one.waiting) / L + after - before) * view.total.count


def _rank_aware(reference: PerfModel | None = None, slo_us: float | None = NO_SLO_US):
    return make_policy(PolicyConfig(policy="rank_aware", avg_response_len=L), reference, slo_us)


def test_high_ranks_follow_the_worker_that_the_models_price_cheaper():
    """The fast worker is busier (6 requests against 4): priced by one model the slow worker always
    wins; priced each by its own, a rank-64 request costs more than 1.5x as much on the slow one."""
    fast, slow = _view("fast", FAST, 6), _view("slow", SLOW, 4)
    policy = _rank_aware()
    for rank, adapter in ((64, "hi"), (32, "hi"), (8, "lo"), (0, None)):
        request = PolicyRequest(rank, 100, adapter)
        predicted = {"fast": _algorithm1_total(FAST, fast, request), "slow": _algorithm1_total(SLOW, slow, request)}
        assert policy.choose([slow, fast], request) == min(predicted, key=predicted.get), rank
    assert policy.choose([slow, fast], PolicyRequest(64, 100, "hi")) == "fast"
    assert policy.choose([slow, fast], PolicyRequest(0, 100)) == "slow"  # base requests still use the slow one
    # priced by one model for both (the views carry none), the same request goes to the less busy worker
    blind = [_view("slow", None, 4), _view("fast", None, 6)]
    assert _rank_aware(FAST).choose(blind, PolicyRequest(64, 100, "hi")) == "slow"


def test_a_mixed_stream_sends_every_high_rank_request_to_the_cheaper_worker():
    views = [_view("slow", SLOW, 0), _view("fast", FAST, 0)]
    policy = _rank_aware()
    routed = []
    for i in range(24):
        rank, adapter = ((64, "hi"), (0, None), (8, "lo"))[i % 3]
        choice = policy.choose(views, PolicyRequest(rank, 100, adapter))
        next(v for v in views if v.worker_id == choice).add_waiting(rank, 100, adapter)
        routed.append((rank, choice))
    assert {choice for rank, choice in routed if rank == 64} == {"fast"}
    assert {choice for rank, choice in routed if rank < 64} == {"fast", "slow"}


def test_a_pending_worker_is_priced_with_the_reference_model():
    request = PolicyRequest(64, 100, "hi")
    ready = _view("ready", FAST, 6)

    def choice(pending_perf: PerfModel | None, reference: PerfModel | None) -> str:
        return _rank_aware(reference).choose([_view("pending", pending_perf, 4), ready], request)

    assert choice(SLOW, None) == "ready" and choice(FAST, None) == "pending"  # the model decides here
    assert choice(None, SLOW) == choice(SLOW, None) == "ready"
    assert choice(None, FAST) == choice(FAST, None) == "pending"


def test_without_a_reference_a_pending_worker_is_priced_with_the_fastest_candidate_model():
    """FAST has the least default SLO of the candidates' models (SLOW_BASE's base model is slower)."""
    request = PolicyRequest(64, 100, "hi")

    def choice(pending_perf: PerfModel | None) -> str:
        views = [_view("base", SLOW_BASE, 9), _view("pending", pending_perf, 4), _view("fast", FAST, 5)]
        return _rank_aware(None).choose(views, request)

    assert choice(FAST) == "pending" and choice(SLOW_BASE) == "fast"  # the model decides here
    assert choice(None) == choice(FAST)


def test_with_no_model_at_all_the_request_goes_to_the_least_loaded_worker():
    views = [_view("a", None, 3), _view("b", None, 1, rank=64), _view("c", None, 2)]
    assert _rank_aware(None, None).choose(views, PolicyRequest(8, 100, "lo")) == "b"
    assert _rank_aware(None).choose(views, PolicyRequest(64, 100, "hi")) == "b"
