"""Generated NATS payloads for every subject: no 5xx error, no crash, no hang, and serving still works.

The public subjects (``generate``, ``cancel``, ``adapters.list``) are probed as a NATS API
client, logged in with client credentials. The internal ones (``route``, ``worker.<id>.submit``
and ``.cancel``, ``adapters.load`` and ``.unload``, ``state.<id>``) are probed with the stack's
operator identity, as a service holding internal credentials could send them. ``state`` goes out
under a worker id no worker has: impersonating a real worker is a matter of trust (credentials),
not of robustness. Payloads come from tests/fuzz/nats_messages.py with a fixed seed and no
shrinking. Afterwards every process is alive, and a good request works over NATS and HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from shared import subjects
from shared.bus import connect
from shared.schemas import (AdapterListRequest, AdapterLoad, AdapterUnload, CancelRequest, GenerateRequest,
                            RouteRequest, Sampling, WorkerState, WorkerSubmit)
from tests.chaos.stack import base_model, client_credentials, completion, dead, operator_credentials
from tests.fuzz.budget import fuzz_examples
from tests.fuzz.nats_messages import payloads
from tests.fuzz.nats_probe import broken, probe

pytestmark = pytest.mark.timeout(max(600, fuzz_examples()))  # about 0.1 s per example

WORKER = "worker-0"
FAKE_WORKER = "fuzz-0"
GOOD_REQUEST_S = 10.0
LEADING = 3  # messages shown before the first that broke a rule (one of them may be the cause)


def templates(model: str) -> dict[str, tuple[dict, bool]]:
    """subject -> (a valid message's map, whether the subject answers)."""
    sampling = Sampling(max_tokens=2, temperature=0.0, top_p=1.0, top_k=0, seed=0)
    route = RouteRequest(request_id="fuzz-route", model=model, prompt_token_ids=[1, 5, 9], sampling=sampling,
                         reply_inbox="_INBOX.fuzz.route")
    generate = GenerateRequest(model=model, prompt=[1, 5, 9], max_tokens=3, temperature=0.0, top_p=1.0, top_k=0,
                               seed=0, stream=True)
    state = WorkerState(worker_id=FAKE_WORKER, model=model, backend="bgmv", free_kv_blocks=8, total_kv_blocks=8)
    messages = {
        subjects.GENERATE: (generate, True),
        subjects.CANCEL: (CancelRequest(request_id="fuzz-cancel"), False),
        subjects.ADAPTERS_LIST: (AdapterListRequest(), True),
        subjects.ROUTE: (route, True),
        subjects.worker_submit(WORKER): (WorkerSubmit.from_route(route, WORKER), True),
        subjects.worker_cancel(WORKER): (CancelRequest(request_id="fuzz-cancel"), False),
        subjects.ADAPTERS_LOAD: (AdapterLoad(name="fuzz_adapter", path="/nonexistent/fuzz_adapter"), True),
        subjects.ADAPTERS_UNLOAD: (AdapterUnload(name="fuzz_adapter"), True),
        subjects.state(FAKE_WORKER): (state, False),
    }
    return {subject: (msgpack.unpackb(m.encode()), answers) for subject, (m, answers) in messages.items()}


PUBLIC = (subjects.GENERATE, subjects.CANCEL, subjects.ADAPTERS_LIST)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A private event loop: hypothesis drives the examples synchronously, each one runs on it."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.mark.parametrize("audience", ["public", "internal"])
def test_fuzzed_nats_messages_never_break_a_service(audience, fuzz_stack, fuzz_tally, loop):
    base = base_model(fuzz_stack)
    chosen = {s: t for s, t in templates(base).items() if (s in PUBLIC) == (audience == "public")}
    credentials = client_credentials(fuzz_stack) if audience == "public" else operator_credentials(fuzz_stack)
    nc = loop.run_until_complete(connect(fuzz_stack.nats_url, f"fuzz-{audience}", credentials=credentials))
    seen: list[tuple[str, str, str, bytes]] = []
    subject_names = sorted(chosen)
    cases = st.sampled_from(subject_names).flatmap(
        lambda s: payloads(chosen[s][0]).map(lambda case: (s, *case)))

    @settings(max_examples=fuzz_examples(), derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def send(case: tuple[str, str, bytes]) -> None:
        subject, kind, payload = case
        outcome = loop.run_until_complete(probe(nc, subject, payload, chosen[subject][1]))
        seen.append((subject, kind, outcome, payload))

    try:
        send()
        good = loop.run_until_complete(good_generate(nc, base)) if audience == "public" else "skipped"
    finally:
        loop.run_until_complete(nc.close())
    for subject, kind, outcome, _ in seen:
        fuzz_tally.add("fuzz-nats", f"{subject.removeprefix(subjects.PREFIX + '.')}: {kind}", outcome)
    status = good_http(fuzz_stack, base)
    fuzz_tally.add("fuzz-nats", f"{audience}: good request afterwards", f"NATS {good}, HTTP {status}")

    first = next((i for i, (_, _, outcome, _) in enumerate(seen) if broken(outcome)), None)
    counts = collections.Counter((s.removeprefix(subjects.PREFIX + "."), outcome) for s, _, outcome, _ in seen)
    assert first is None, (f"{sum(broken(o) for _, _, o, _ in seen)} of {len(seen)} messages broke a rule "
                           f"({dict(counts)}); the first, after the {LEADING} before it:\n"
                           + "\n".join(describe(*seen[i]) for i in range(max(0, first - LEADING), first + 1)))
    assert not dead(fuzz_stack), f"processes died: {dead(fuzz_stack)}"
    assert good in ("chunk length", "chunk stop", "skipped"), good
    assert status == 200, status


def describe(subject: str, kind: str, outcome: str, payload: bytes) -> str:
    """One probe, readable: its subject, class, outcome and decoded payload (cut short)."""
    try:
        shown = repr(msgpack.unpackb(payload, raw=False, strict_map_key=False))
    except (ValueError, msgpack.UnpackException):
        shown = repr(payload)
    return f"  {subject} [{kind}] -> {outcome}: {shown[:300]}"


async def good_generate(nc, model: str) -> str:
    request = GenerateRequest(model=model, prompt="hello", max_tokens=4, temperature=0, stream=False)
    return await probe(nc, subjects.GENERATE, request.encode(), True)


def good_http(stack, model: str) -> int:
    """A small completion's status, retried for a few seconds (a fake worker's state may linger ~1 s)."""
    deadline = time.monotonic() + GOOD_REQUEST_S
    status = 0
    while time.monotonic() < deadline:
        status, _ = completion(stack, model)
        if status == 200:
            return status
        time.sleep(0.5)
    return status
