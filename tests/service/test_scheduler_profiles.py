"""The scheduler prices each worker with the profile that worker publishes (fetched once per digest)."""

from __future__ import annotations

import logging

import pytest

from services.gpu_worker.profiling.profile_cache import profile_digest
from services.scheduler.policies import PolicyConfig, PolicyRequest, make_policy
from services.scheduler.worker_view import WorkerView
from shared import subjects
from shared.perf_model import PerfModel
from shared.schemas import AdapterInfo, RouteReply
from tests.service.helpers import client, start_scheduler, start_worker, wait_until
from tests.service.test_scheduler_service import route_request

pytestmark = pytest.mark.timeout(30)

ADAPTERS = [AdapterInfo(name="hi", rank=64, level="device"), AdapterInfo(name="lo", rank=8, level="device")]
RANKS = {"hi": 64, "lo": 8, None: 0}


def model(rank_factor: float, backend: str = "mbgmv") -> PerfModel:
    """A decode/prefill model whose rank-dependent costs are scaled by ``rank_factor``."""
    return PerfModel.from_coefficients(
        backend, decode={"const": 20_000.0, "requests": 800.0, "sum_rank": 40.0 * rank_factor, "tokens": 5.0},
        prefill={"const": 30_000.0, "tokens": 600.0, "token_rank": 8.0 * rank_factor},
        model="tiny", model_digest="0123456789abcdef", device_name="test device", dtype="bfloat16")


async def test_each_worker_is_priced_by_its_own_profile_and_high_ranks_go_to_the_cheaper(nats_server, stack):
    scheduler = await start_scheduler(stack, nats_server.url, policy="rank_aware")
    fast, slow = model(1.0), model(3.0)  # the slow device costs 3x per rank
    # the slow worker starts first, so among equal prices (one model for both) it would win every tie
    b = await start_worker(stack, nats_server.url, "slow", adapters=ADAPTERS, backend="mbgmv",
                           profile_text=slow.to_text(), state_interval_s=10.0, mode="stall")
    a = await start_worker(stack, nats_server.url, "fast", adapters=ADAPTERS, backend="mbgmv",
                           profile_text=fast.to_text(), state_interval_s=10.0, mode="stall")
    await wait_until(lambda: sum(r.perf is not None for r in scheduler.fleet.live(scheduler.clock())) == 2)
    # the same decisions, predicted from the two models alone
    policy = make_policy(PolicyConfig(policy="rank_aware"))
    views = [WorkerView("slow", 8, perf=slow), WorkerView("fast", 8, perf=fast)]
    bus = await client(stack, nats_server.url)
    adapters = ["hi", None, "hi", "lo", "hi", None, "hi", "hi"]
    routed, predicted = [], []
    for n, adapter in enumerate(adapters):
        wanted = PolicyRequest(rank=RANKS[adapter], prompt_tokens=3, adapter=adapter)
        choice = policy.choose(views, wanted)
        next(v for v in views if v.worker_id == choice).add_waiting(wanted.rank, 3, adapter)
        predicted.append(choice)
        reply = await bus.request(subjects.ROUTE, route_request(n, "_INBOX.unused", adapter=adapter), RouteReply, 2)
        routed.append(reply.worker_id)
    assert routed == predicted
    high = [w for w, adapter in zip(routed, adapters) if adapter == "hi"]
    assert set(high) == {"fast"}  # every rank-64 request follows the cheaper worker
    assert "slow" in routed  # and the slow one still takes work (base and low-rank requests)
    assert a.profile_requests == 1 and b.profile_requests == 1  # one fetch per digest, many states


async def test_a_pending_worker_is_priced_by_the_fallback_until_its_profile_arrives(nats_server, stack):
    scheduler = await start_scheduler(stack, nats_server.url, policy="rank_aware")
    await start_worker(stack, nats_server.url, "ready", adapters=ADAPTERS, backend="mbgmv",
                       profile_text=model(1.0).to_text(), mode="stall")
    pending = await start_worker(stack, nats_server.url, "pending", adapters=ADAPTERS, backend="mbgmv",
                                 profile="pending", mode="stall")
    await wait_until(lambda: len(scheduler.fleet.live(scheduler.clock())) == 2)
    await wait_until(lambda: scheduler.fleet.get("ready").perf is not None)
    assert scheduler.fleet.get("pending").perf is None and pending.profile_requests == 0
    bus = await client(stack, nats_server.url)
    routed = [(await bus.request(subjects.ROUTE, route_request(n, "_INBOX.unused", adapter="hi"), RouteReply,
                                 2)).worker_id for n in range(4)]
    assert "pending" in routed  # priced with the ready worker's model, it shares the load
    pending.profile_text = model(3.0).to_text()
    pending.profile = profile_digest(pending.profile_text)
    await wait_until(lambda: scheduler.fleet.get("pending").perf is not None)
    assert scheduler.fleet.get("pending").view.perf.decode.coefficient("sum_rank") == pytest.approx(120.0)
    assert pending.profile_requests == 1


async def test_a_profile_for_another_backend_is_refused_once_with_a_clear_line(nats_server, stack, caplog):
    caplog.set_level(logging.WARNING, logger="services.scheduler.profile_book")
    scheduler = await start_scheduler(stack, nats_server.url, policy="rank_aware")
    worker = await start_worker(stack, nats_server.url, "odd", adapters=ADAPTERS, backend="mbgmv",
                                profile_text=model(1.0, backend="bgmv").to_text())
    await wait_until(lambda: worker.profile_requests == 1)
    await wait_until(lambda: "refused" in caplog.text)
    assert "made for backend 'bgmv'; the worker runs 'mbgmv'" in caplog.text
    for _ in range(5):
        await worker.publish_state()
    await wait_until(lambda: worker.seq >= 6)
    assert worker.profile_requests == 1 and scheduler.fleet.get("odd").perf is None
