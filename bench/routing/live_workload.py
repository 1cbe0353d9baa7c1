"""The live routing check's workload: mixed-rank generate requests over NATS, and every worker state seen.

The requests cycle through the base model and every adapter (so each arrival window holds
several ranks), with seeded prompt and output lengths. The first ``burst`` are sent at once
(the scheduler routes them before any worker state can show them: pending routes), the rest
one every ``spacing_ms``. Every ``state.<id>`` the workers publish meanwhile is recorded, so
the decisions' inputs can be compared with what the workers really reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from shared import subjects
from shared.bus import Bus
from shared.config import option, require
from shared.nats_auth import Credentials
from shared.schemas import Chunk, GenerateRequest, WorkerState

WORDS = ("river", "stone", "lamp", "garden", "orbit", "copper", "window", "signal", "harbor", "maple")


@dataclass
class LiveWorkload:
    """How many requests, how they arrive and how long they are."""

    requests: int = option(80, "requests in all")
    burst: int = option(10, "requests sent at once at the start")
    spacing_ms: float = option(50.0, "then one request every this many ms")
    min_prompt_words: int = option(3, "shortest prompt (words)")
    max_prompt_words: int = option(40, "longest prompt (words)")
    min_tokens: int = option(4, "fewest tokens a request generates")
    max_tokens: int = option(24, "most tokens a request generates")
    seed: int = option(0, "seed of lengths")

    def __post_init__(self) -> None:
        require(self.requests >= 1, "requests must be >= 1")
        require(0 <= self.burst <= self.requests, "burst must be in [0, requests]")
        require(self.spacing_ms >= 0, "spacing_ms must be >= 0")
        require(1 <= self.min_prompt_words <= self.max_prompt_words, "need 1 <= min_prompt_words <= max_prompt_words")
        require(1 <= self.min_tokens <= self.max_tokens, "need 1 <= min_tokens <= max_tokens")


def model_names(http_url: str) -> tuple[str, list[str]]:
    """The base model's name and the adapters' names, from the gateway's ``GET /v1/models``."""
    with urllib.request.urlopen(f"{http_url}/v1/models", timeout=10) as resp:
        models = json.loads(resp.read())["data"]
    base = [m["id"] for m in models if m.get("parent") is None]
    if len(base) != 1:
        raise RuntimeError(f"expected one base model, got {base}")
    return base[0], sorted(m["id"] for m in models if m.get("parent") is not None)


def make_schedule(base: str, adapters: list[str], workload: LiveWorkload) -> list[tuple[float, GenerateRequest]]:
    """(send offset in s, request) pairs, in sending order."""
    rng = random.Random(workload.seed)
    models = [base, *adapters]
    schedule = []
    for i in range(workload.requests):
        words = rng.randint(workload.min_prompt_words, workload.max_prompt_words)
        request = GenerateRequest(model=models[i % len(models)], prompt=" ".join(rng.choices(WORDS, k=words)),
                                  max_tokens=rng.randint(workload.min_tokens, workload.max_tokens), temperature=0,
                                  ignore_eos=True, request_id=f"live-{workload.seed}-{i}")
        offset = 0.0 if i < workload.burst else (i - workload.burst + 1) * workload.spacing_ms / 1000.0
        schedule.append((offset, request))
    return schedule


@dataclass
class Outcome:
    """What came back: each request's final chunk and token count, and the worker states seen."""

    finals: dict[str, Chunk] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    states: dict[str, list[WorkerState]] = field(default_factory=lambda: defaultdict(list))
    wall_s: float = 0.0


async def drive(nats_url: str, schedule: list[tuple[float, GenerateRequest]], workers: int,
                timeout_s: float, credentials: Credentials | None = None) -> Outcome:
    """Send ``schedule`` on ``generate`` and wait for every final chunk (TimeoutError after ``timeout_s``).

    State recording starts first, and sending waits until two states of each of ``workers`` were
    seen, so every state a decision can hold is recorded.
    """
    outcome = Outcome()
    seen = asyncio.Event()

    def on_state(state: WorkerState, msg: object) -> None:
        outcome.states[state.worker_id].append(state)
        if len(outcome.states) >= workers and all(len(s) >= 2 for s in outcome.states.values()):
            seen.set()

    async with contextlib.AsyncExitStack() as stack:
        bus = await Bus.open(nats_url, "live-routing", stack, grace_s=0.1, credentials=credentials)
        await bus.listen(subjects.STATE_ALL, WorkerState, on_state)
        await asyncio.wait_for(seen.wait(), timeout_s)
        done = {r.request_id: asyncio.Event() for _, r in schedule}
        started = time.monotonic()
        for offset, request in schedule:
            delay = started + offset - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await _send(bus, request, outcome, done[request.request_id])
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in done.values())), timeout_s)
        outcome.wall_s = time.monotonic() - started
    return outcome


async def _send(bus: Bus, request: GenerateRequest, outcome: Outcome, done: asyncio.Event) -> None:
    rid = request.request_id
    assert rid is not None
    outcome.tokens[rid] = 0

    def on_chunk(chunk: Chunk, msg: object) -> None:
        outcome.tokens[rid] += len(chunk.token_ids)
        if chunk.final:
            outcome.finals[rid] = chunk
            done.set()

    inbox = bus.nc.new_inbox()
    await bus.listen(inbox, Chunk, on_chunk)
    await bus.publish(subjects.GENERATE, request, reply=inbox)
