"""Live check of rank-aware routing: 2 gpu_workers, a mixed-rank workload, every decision replayed.

The stack runs one ``rank_aware`` scheduler with its decision log on, using a profile measured
here on the tiny model (small grid). The workload (``bench/routing/live_workload.py``) cycles through
the base model and the 7 tiny adapters (ranks 8 to 64): a burst, then staggered arrivals.
The checks:

* every request completes, and every route appears in the log;
* each logged decision is what ``make_policy(...).choose(views, request)`` returns on the logged
  inputs (views rebuilt from the log);
* those inputs are what the workers published: the held state's running requests and queue,
  plus the pending (routed, not yet shown) requests;
* the state lag figures (printed) are within the fleet's liveness bound.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from bench.routing.live_routing import live_stack_config, report, run_live
from bench.routing.live_workload import LiveWorkload
from services.gpu_worker.profiling import profiler as profiler_mod
from services.gpu_worker.engine_config import EngineConfig
from services.scheduler.config import SchedulerConfig
from services.scheduler.decision_log import stats_summary
from services.scheduler.sim.decision_replay import replay
from services.scheduler.policies import PolicyConfig, make_policy
from services.scheduler.worker_view import WorkerView
from shared.perf_model import PerfModel

pytestmark = pytest.mark.timeout(180)

WORKLOAD = LiveWorkload(requests=48, burst=12, spacing_ms=20.0, max_prompt_words=30, max_tokens=16)
PROFILE_GRID = profiler_mod.ProfileConfig(batch_sizes=(1, 2, 4, 8), ranks=(8, 16, 32, 64), mixed_draws=1,
                                          decode_steps=3, prompt_min=4, prompt_max=24)


@pytest.fixture(scope="module")
def live_profile(tiny_model_dir, tmp_path_factory) -> Path:
    """A bgmv profile of the tiny model, measured now (synthetic profiling adapters in a tmp cache).

    One torch thread, as each of the stack's two workers gets on this 2-core box (and so that a
    busy machine does not stall the profile's steps); the session's thread count is restored.
    """
    out = tmp_path_factory.mktemp("live_profile") / "profile.json"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARASERVE_CACHE_DIR", str(out.parent / "cache"))
        mp.setattr(profiler_mod, "ADAPTERS_PER_RANK", 2)
        engine = EngineConfig(backend="bgmv", dtype="float32", device="cpu", num_threads=1)
        try:
            profiler_mod.profile(tiny_model_dir, engine, PROFILE_GRID).save(out)
        finally:
            torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def live_run(tiny_model_dir, tiny_adapters, live_profile, tmp_path_factory):
    root = tmp_path_factory.mktemp("live_adapters")
    for name, path in tiny_adapters.items():
        shutil.copytree(path, root / name)
    run_dir = tmp_path_factory.mktemp("live_run")
    config = live_stack_config(tiny_model_dir, root, live_profile, run_dir, workers=2, cold_start="cached",
                               ready_timeout_s=120, extra_env={"CARASERVE_DTYPE": "float32",
                                                               "CARASERVE_NUM_KV_BLOCKS": "256"})
    return run_live(config, WORKLOAD, timeout_s=60)


def test_every_request_completes_and_every_route_is_logged(live_run):
    finals = live_run.outcome.finals
    assert len(finals) == WORKLOAD.requests
    assert all(c.finish_reason == "length" for c in finals.values()), [c.error for c in finals.values() if c.error]
    chosen = {d.request_id for d in live_run.decisions if d.choice is not None}
    assert chosen == set(finals)
    assert all(len(d.workers) == 2 for d in live_run.decisions)
    assert {d.choice for d in live_run.decisions} == {"worker-0", "worker-1"}
    assert len({d.request.rank for d in live_run.decisions}) >= 4  # base + ranks 8..64


def test_each_decision_is_what_the_policy_function_gives(live_run, live_profile):
    policy = make_policy(PolicyConfig(policy="rank_aware"), PerfModel.load(live_profile))
    assert live_run.header.policy == PolicyConfig(policy="rank_aware")
    assert policy.slo_us == live_run.header.slo_us
    assert replay(policy, live_run.decisions) == []
    loaded = [d for d in live_run.decisions if all(w["total"]["count"] for w in d.workers)]
    assert loaded, "no decision weighed two busy workers"


def _summary(loads) -> dict:
    """The summary of ``loads`` as it reads back from the log (JSON makes histogram keys strings)."""
    return json.loads(json.dumps(stats_summary(WorkerView.build("w", 1, running=loads).running)))


def test_logged_inputs_are_what_the_workers_published(live_run):
    published = {(w, s.seq): s for w, states in live_run.outcome.states.items() for s in states}
    pending_seen = 0
    for decision in live_run.decisions:
        for snap in decision.workers:
            state = published[(snap["worker_id"], snap["seq"])]
            assert snap["state_timestamp"] == state.timestamp
            assert snap["running"] == _summary(state.running)
            assert snap["waiting"]["count"] == len(state.queued) + snap["pending"]
            queued = _summary(state.queued)
            assert snap["pending"] or snap["waiting"] == queued
            assert snap["total"]["count"] == snap["running"]["count"] + snap["waiting"]["count"]
            assert snap["max_batch"] == state.max_batch_size and snap["free_kv_blocks"] == state.free_kv_blocks
            levels = {a.name: a.level for a in state.adapters}
            adapter = decision.request.adapter
            assert snap["residency"] == ("device" if adapter is None else levels[adapter])
            pending_seen += snap["pending"]
    assert pending_seen > 0  # the burst was routed before any state showed it


def test_state_lag_is_reported_and_bounded(live_run, live_profile):
    figures = report(live_run, make_policy(PolicyConfig(policy="rank_aware"), PerfModel.load(live_profile)))
    print("\nlive routing:", json.dumps(figures, indent=1))
    lag = figures["lag"]
    assert figures["decisions_agree"] and figures["completed"] == WORKLOAD.requests
    assert lag["decisions"] == len(live_run.decisions) and lag["decisions_with_pending"] >= 1
    assert 0 <= lag["state_age_ms"]["p50"] <= lag["state_age_ms"]["p99"] <= lag["state_age_ms"]["max"]
    assert lag["state_age_ms"]["max"] < SchedulerConfig().dead_after_s * 1e3  # only live workers' states
    assert lag["state_lag_ms"]["max"] >= lag["state_age_ms"]["max"] - 5.0  # lag = transport + age
