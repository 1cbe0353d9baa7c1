"""Two scheduler replicas in one queue group: every request is routed exactly once, and both replicas route.

Observed from outside the services: a plain (non-queue) NATS subscriber sees every
``route`` request and every ``worker.<id>.submit`` the schedulers send, and the collector
receives one ``scheduler.route`` span per routing, tagged with the replica's service name.
"""

from __future__ import annotations

import asyncio
import collections
import time

import pytest

from shared import subjects
from shared.schemas import GenerateRequest, RouteRequest, WorkerSubmit
from tests.e2e.clients import generate, model_names

pytestmark = pytest.mark.timeout(120)

REQUESTS = 24


async def test_two_scheduler_replicas_route_each_request_exactly_once(e2e_stack, nats_client, e2e_collector):
    base, adapters = model_names(e2e_stack.http_url)
    routes: list[RouteRequest] = []
    submits: list[WorkerSubmit] = []
    await nats_client.listen(subjects.ROUTE, RouteRequest, lambda m, _: routes.append(m))
    await nats_client.listen(f"{subjects.PREFIX}.worker.*.submit", WorkerSubmit, lambda m, _: submits.append(m))
    ids = [f"e2e-route-{i}" for i in range(REQUESTS)]
    models = [base, *adapters]
    streams = await asyncio.gather(*(
        generate(nats_client, GenerateRequest(model=models[i % len(models)], prompt=f"request number {i}",
                                              max_tokens=3, temperature=0, ignore_eos=True, request_id=rid))
        for i, rid in enumerate(ids)))
    assert all(s.final.finish_reason == "length" and len(s.token_ids) == 3 for s in streams)

    assert sorted(r.request_id for r in routes) == sorted(ids)
    assert sorted(s.request_id for s in submits) == sorted(ids)  # one submit each: no replica routed twice
    assert {s.worker_id for s in submits} == {"worker-0", "worker-1"}

    deadline = time.monotonic() + 10
    while True:
        spans = [s for s in e2e_collector.spans()
                 if s.name == "scheduler.route" and s.attributes.get("request.id") in ids]
        if len(spans) >= REQUESTS or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    per_request = collections.Counter(s.attributes["request.id"] for s in spans)
    assert per_request == collections.Counter(ids)
    replicas = collections.Counter(s.service for s in spans)
    assert set(replicas) == {"caraserve-scheduler-0", "caraserve-scheduler-1"}, replicas
