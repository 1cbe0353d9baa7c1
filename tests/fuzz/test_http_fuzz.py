"""Generated HTTP bodies for both OpenAI endpoints: no 5xx, no crash, no hang, and serving still works.

Hypothesis draws valid-ish, hostile-JSON and not-JSON bodies (tests/fuzz/http_bodies.py) with a
fixed seed and no shrinking (each example is a live request; a broken rule is reported with the
bodies that broke it). Every answer must come within ``ANSWER_S``, be below 500, carry an
OpenAI-style error when it is a 4xx, and a streamed 200 must end with ``[DONE]``. Afterwards every
process of the stack is alive and a good request gets its completion.
"""

from __future__ import annotations

import collections

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from tests.chaos.stack import adapter_names, base_model, completion, dead
from tests.fuzz.budget import fuzz_examples
from tests.fuzz.http_bodies import bodies
from tests.fuzz.http_probe import broken, probe

pytestmark = pytest.mark.timeout(max(600, fuzz_examples()))  # about 0.1 s per example

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
SHOWN = 5  # offending bodies quoted in a failure, at most


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_fuzzed_bodies_never_break_the_gateway(endpoint, fuzz_stack, fuzz_tally):
    base = base_model(fuzz_stack)
    models = [base] + adapter_names(fuzz_stack)[:2] + ["no-such-model"]
    seen: list[tuple[str, str, bytes]] = []

    @settings(max_examples=fuzz_examples(), derandomize=True, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=bodies(models, chat=endpoint == "chat"))
    def send(case: tuple[str, bytes]) -> None:
        kind, body = case
        seen.append((kind, probe(fuzz_stack.http_port, ENDPOINTS[endpoint], body), body))

    send()
    for kind, outcome, _ in seen:
        fuzz_tally.add("fuzz-http", f"{endpoint}: {kind}", outcome)
    status, reply = completion(fuzz_stack, base)
    fuzz_tally.add("fuzz-http", f"{endpoint}: good request afterwards", str(status))

    bad = [(outcome, body[:300]) for _, outcome, body in seen if broken(outcome)]
    counts = collections.Counter(outcome for _, outcome, _ in seen)
    assert not bad, f"{len(bad)} of {len(seen)} bodies broke a rule ({dict(counts)}); first:\n" + "\n".join(
        f"  {outcome}: {body!r}" for outcome, body in bad[:SHOWN])
    assert not dead(fuzz_stack), f"processes died: {dead(fuzz_stack)}"
    assert status == 200 and reply["choices"][0]["finish_reason"] in ("stop", "length"), (status, reply)
