"""Client-side helpers for the end-to-end tests: NATS generate streams, the OpenAI client, state watching."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import openai

from shared import subjects
from shared.bus import Bus
from shared.schemas import Chunk, GenerateRequest, WorkerState

OTEL_VARS = ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_SERVICE_NAME",
             "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
             "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL")  # what the services read


def openai_client(http_url: str) -> openai.OpenAI:
    """The official client on the gateway (open mode: any key works); no retries hide failures."""
    return openai.OpenAI(base_url=f"{http_url}/v1", api_key="x", max_retries=0, timeout=60)


def model_names(http_url: str) -> tuple[str, list[str]]:
    """The base model's name and the adapters' names, from ``GET /v1/models``."""
    models = openai_client(http_url).models.list().data
    base = [m.id for m in models if getattr(m, "parent", None) is None]
    assert len(base) == 1, models
    return base[0], sorted(m.id for m in models if getattr(m, "parent", None) is not None)


@dataclass
class NatsStream:
    """The chunks one GenerateRequest published on ``caraserve.v1.generate`` got back, with arrival times."""

    request: GenerateRequest
    chunks: list[Chunk] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def on_chunk(self, chunk: Chunk, msg: object) -> None:
        self.chunks.append(chunk)
        self.arrivals.append(time.monotonic())
        if chunk.final:
            self.done.set()

    @property
    def token_ids(self) -> list[int]:
        return [t for c in self.chunks for t in c.token_ids]

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def final(self) -> Chunk:
        assert self.chunks and self.chunks[-1].final, self.chunks[-1:]
        return self.chunks[-1]


async def subscribe(bus: Bus, request: GenerateRequest) -> tuple[NatsStream, str]:
    """A stream for ``request`` and the fresh inbox its chunks will land on (already subscribed)."""
    stream = NatsStream(request)
    inbox = bus.nc.new_inbox()
    await bus.listen(inbox, Chunk, stream.on_chunk)
    return stream, inbox


async def send(bus: Bus, request: GenerateRequest) -> NatsStream:
    """Publish ``request`` with a fresh reply inbox; its chunks land in the returned stream."""
    return (await send_all(bus, [request]))[0]


async def send_all(bus: Bus, requests: list[GenerateRequest]) -> list[NatsStream]:
    """Subscribe every request's inbox, then publish the requests back to back."""
    opened = [await subscribe(bus, r) for r in requests]
    for stream, inbox in opened:
        await bus.nc.publish(subjects.GENERATE, stream.request.encode(), reply=inbox)
    await bus.nc.flush()
    return [stream for stream, _ in opened]


async def generate(bus: Bus, request: GenerateRequest, timeout_s: float = 30.0) -> NatsStream:
    stream = await send(bus, request)
    await asyncio.wait_for(stream.done.wait(), timeout_s)
    return stream


class StateWatch:
    """The latest ``state.<id>`` of every worker, and a way to wait for a condition on them."""

    def __init__(self) -> None:
        self.latest: dict[str, WorkerState] = {}
        self.placed: dict[str, str] = {}  # request key -> the last worker whose state held it
        self.held_by: dict[str, set[str]] = {}  # request key -> every worker whose state held it
        self.runs: dict[str, set[tuple[str, str]]] = {}  # request key -> every (worker, instance) that held it
        self.blocks_in_use: dict[str, int] = {}  # request key -> most KV blocks in use on its worker meanwhile
        self._changed = asyncio.Event()

    async def start(self, bus: Bus) -> StateWatch:
        await bus.listen(subjects.STATE_ALL, WorkerState, self._on_state)
        return self

    def _on_state(self, state: WorkerState, msg: object) -> None:
        self.latest[state.worker_id] = state
        in_use = state.total_kv_blocks - state.free_kv_blocks
        for key in state.request_keys():
            self.placed[key] = state.worker_id
            self.held_by.setdefault(key, set()).add(state.worker_id)
            self.runs.setdefault(key, set()).add((state.worker_id, state.instance))
            self.blocks_in_use[key] = max(self.blocks_in_use.get(key, 0), in_use)
        self._changed.set()

    async def wait_for(self, predicate: Callable[[dict[str, WorkerState]], bool], timeout_s: float) -> None:
        """Until ``predicate(latest)`` holds (AssertionError after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while not predicate(self.latest):
            left = deadline - time.monotonic()
            assert left > 0, f"worker states never satisfied the condition: {self.latest}"
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass


def all_blocks_free(states: dict[str, WorkerState]) -> bool:
    return bool(states) and all(s.free_kv_blocks == s.total_kv_blocks and not s.request_keys()
                                for s in states.values())
