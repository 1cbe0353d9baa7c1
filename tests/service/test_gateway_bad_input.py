"""Bad input gets a 4xx, fast, and disturbs nothing (issue 13 §2), on the HTTP and NATS edges.

One regression test per defect the probe found. Each asserts the status, the OpenAI-style
error shape, and that a good request is still served afterwards.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import msgpack
import pytest

from services.gateway.http_api import max_body_bytes
from services.gateway.json_body import MAX_DEPTH
from services.gateway.prepare import MAX_CHARS_PER_TOKEN
from shared.schemas import ERROR_CODES, GenerateRequest
from tests.service.helpers import client, make_adapter_dir, start_gateway, start_scheduler, start_worker, wait_until
from tests.service.test_gateway_service import ADAPTERS, WORKER_ADAPTERS, nats_generate

pytestmark = pytest.mark.timeout(60)

GOOD = {"model": "sql", "prompt": "hello", "max_tokens": 2}
FAST_S = 2.0  # every refusal below comes back within this (tokenizing the huge prompt takes ~10 s)


@pytest.fixture
async def serving(nats_server, stack, tiny_model_dir, tmp_path):
    """Scheduler, gateway and one fake worker; returns (gateway, HTTP base URL, worker)."""
    async def make(step_s: float = 0.002, **gateway_overrides):
        await start_scheduler(stack, nats_server.url)
        gateway = await start_gateway(stack, nats_server.url, tiny_model_dir,
                                      adapter_dir=str(make_adapter_dir(tmp_path / "adapters", ADAPTERS)),
                                      **gateway_overrides)
        worker = await start_worker(stack, nats_server.url, "w0", model=gateway.model_name, adapters=WORKER_ADAPTERS,
                                    step_s=step_s)
        await wait_until(lambda: "w0" in gateway.fleet.live_workers())
        return gateway, f"http://127.0.0.1:{gateway.http_port}", worker
    return make


async def post(http: aiohttp.ClientSession, url: str, body: bytes | dict) -> tuple[int, dict]:
    """POST ``body`` (raw bytes, or an object to JSON-encode); the answer must be JSON, and fast."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    started = time.monotonic()
    async with http.post(url, data=data, headers={"Content-Type": "application/json"}) as response:
        assert response.content_type == "application/json", await response.text()
        result = response.status, await response.json()
    assert time.monotonic() - started < FAST_S, f"{url} took {time.monotonic() - started:.2f}s"
    return result


def error_of(status: int, body: dict, want_status: int, code: str) -> str:
    """The message of an OpenAI-style error with ``want_status`` and ``code``."""
    assert status == want_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code", "param"}, body
    assert body["error"]["code"] == code and body["error"]["type"] == ERROR_CODES[code][0], body
    return body["error"]["message"]


async def assert_still_serving(http: aiohttp.ClientSession, base: str) -> None:
    status, body = await post(http, f"{base}/v1/completions", GOOD)
    assert status == 200 and body["usage"]["completion_tokens"] == 2, body
    async with http.get(f"{base}/health") as response:
        assert (await response.json())["inflight"] == 0


TINY_CONTEXT = 512  # the tiny model's max_position_embeddings


def with_field(raw_value: str, name: str = "user") -> bytes:
    """A good body plus the field ``name`` holding ``raw_value`` as raw JSON text."""
    return (json.dumps(GOOD)[:-1] + f', "{name}": {raw_value}}}').encode()


async def test_deeply_nested_bodies_are_400(serving):
    _, base, _ = await serving()
    url = f"{base}/v1/completions"
    async with aiohttp.ClientSession() as http:
        for depth in (100_000, 500, MAX_DEPTH):  # past the parser's recursion limit, and past MAX_DEPTH
            message = error_of(*await post(http, url, with_field("[" * depth + "]" * depth)), 400, "invalid_request")
            assert f"deeper than {MAX_DEPTH} levels" in message
        # the body object is one level: an ignored field may nest MAX_DEPTH - 1 more
        status, body = await post(http, url, with_field("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)))
        assert status == 200, body
        await assert_still_serving(http, base)


async def test_huge_numbers_anywhere_are_400(serving):
    _, base, _ = await serving()
    url = f"{base}/v1/completions"
    async with aiohttp.ClientSession() as http:
        for name in ("max_tokens", "user"):
            for literal in ("9" * 5000, "-" + "9" * 5000):
                message = error_of(*await post(http, url, with_field(literal, name)), 400, "invalid_request")
                assert "a number is too large" in message
        message = error_of(*await post(http, url, with_field("1" + "0" * 5000 + ".5", "temperature")), 400,
                           "invalid_request")
        assert message.startswith("temperature: must be finite")
        for constant in ("NaN", "-Infinity"):
            message = error_of(*await post(http, url, with_field(constant, "temperature")), 400, "invalid_request")
            assert "is not a valid JSON number" in message
        await assert_still_serving(http, base)


@pytest.mark.parametrize("name, value", [("top_k", 2**64), ("seed", 2**64), ("seed", -(2**64)),
                                         ("max_tokens", 2**70), ("prompt", [2**64])])
async def test_out_of_range_integers_are_400(serving, name, value):
    _, base, worker = await serving()
    async with aiohttp.ClientSession() as http:
        message = error_of(*await post(http, f"{base}/v1/completions", {**GOOD, name: value}), 400,
                           "invalid_request")
        assert message.startswith(name), message
        await assert_still_serving(http, base)
    assert len(worker.submits) == 1  # only the good request reached a worker


async def test_lone_surrogates_are_400_with_a_clear_message(serving):
    _, base, _ = await serving()
    async with aiohttp.ClientSession() as http:
        chat = {"model": "sql", "messages": [{"role": "user", "content": "\ud800"}]}
        bodies = [(f"{base}/v1/completions", {**GOOD, "prompt": "tell me \ud800 more"}),
                  (f"{base}/v1/completions", {**GOOD, "stop": ["\udfff"]}),
                  (f"{base}/v1/chat/completions", chat)]
        for url, body in bodies:  # json.dumps writes them as \\ud800 escapes, which JSON allows
            message = error_of(*await post(http, url, body), 400, "invalid_request")
            assert "lone surrogate" in message, message
        raw = b'{"model": "sql", "prompt": "\xed\xa0\x80"}'  # a UTF-8-encoded surrogate is not UTF-8
        assert "not UTF-8" in error_of(*await post(http, f"{base}/v1/completions", raw), 400, "invalid_request")
        await assert_still_serving(http, base)


async def test_a_bad_stream_options_is_400_and_starts_nothing(serving):
    gateway, base, worker = await serving(step_s=0.05)
    bad = ["yes", [1], 3, {"include_usage": "yes"}]
    async with aiohttp.ClientSession() as http:
        for i in range(20):
            body = {**GOOD, "max_tokens": 200, "stream": True, "stream_options": bad[i % len(bad)]}
            message = error_of(*await post(http, f"{base}/v1/completions", body), 400, "invalid_request")
            assert "stream_options" in message
        async with http.get(f"{base}/health") as response:
            assert (await response.json())["inflight"] == 0
        assert not worker.submits and not gateway.relay.active
        async with http.post(f"{base}/v1/completions", json={**GOOD, "stream": True,
                                                              "stream_options": {"include_usage": True}}) as response:
            events = [line async for line in response.content if line.strip()]
        assert response.status == 200 and b'"completion_tokens":2' in events[-2] and events[-1] == b"data: [DONE]\n"
    await wait_until(lambda: gateway.relay.limiter.count == 0)


async def test_framework_errors_are_openai_json(serving):
    _, base, _ = await serving()
    async with aiohttp.ClientSession() as http:
        message = error_of(*await post(http, f"{base}/v1/nothing-here", GOOD), 404, "unknown_url")
        assert message == "Invalid URL (POST /v1/nothing-here)"
        async with http.get(f"{base}/v1/completions") as response:
            assert response.headers["Allow"] == "POST"
            error_of(response.status, await response.json(), 405, "method_not_allowed")
        too_large = with_field('"' + "x" * max_body_bytes(TINY_CONTEXT) + '"')
        error_of(*await post(http, f"{base}/v1/completions", too_large), 413, "request_too_large")
        await assert_still_serving(http, base)


async def test_a_huge_prompt_is_refused_by_size_before_tokenizing(serving, stack, nats_server):
    gateway, base, worker = await serving()
    limit = TINY_CONTEXT * MAX_CHARS_PER_TOKEN
    huge = "many words " * 700_000  # 7.7 MB: several seconds of tokenizing here
    async with aiohttp.ClientSession() as http:
        message = error_of(*await post(http, f"{base}/v1/completions", {**GOOD, "prompt": huge}), 413,
                           "request_too_large")  # larger than any valid request: not even read in full
        for url, body in [(f"{base}/v1/completions", {**GOOD, "prompt": huge[:limit * 4]}),
                          (f"{base}/v1/chat/completions", {"model": "sql", "messages": [
                              {"role": "system", "content": huge[:limit]}, {"role": "user", "content": "x"}]})]:
            message = error_of(*await post(http, url, body), 400, "context_length_exceeded")
            assert f"more than the {limit} that could fit" in message
        await assert_still_serving(http, base)
    bus = await client(stack, nats_server.url)
    chunks = await nats_generate(bus, GenerateRequest(model="sql", prompt=huge[:7_000_000]))
    assert len(chunks) == 1 and chunks[0].error.code == "context_length_exceeded"
    assert len(worker.submits) == 1


async def test_health_answers_fast_while_a_long_prompt_is_tokenized(serving):
    context = 1 << 16  # allows a prompt of 4 M characters
    _, base, _ = await serving(max_model_len=context)
    prompt = "hello world, the quick brown fox. " * 12_000  # 400 k characters, 0.1-0.5 s of tokenizing
    latencies: list[float] = []
    async with aiohttp.ClientSession() as http:
        async def tokenize_it() -> tuple[int, dict]:  # tokenized in full, then refused by max_tokens
            async with http.post(f"{base}/v1/completions", json={**GOOD, "prompt": prompt, "max_tokens": context}) \
                    as response:
                return response.status, await response.json()

        pending = asyncio.ensure_future(tokenize_it())
        while not pending.done():
            started = time.monotonic()
            async with http.get(f"{base}/health") as response:
                assert response.status == 200
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.005)
        error_of(*pending.result(), 400, "context_length_exceeded")
        await assert_still_serving(http, base)
    assert len(latencies) >= 5, latencies  # the probes ran while the prompt was tokenized
    assert max(latencies) < 0.1, sorted(latencies)[-5:]


async def test_nats_generate_refuses_hostile_payloads_with_one_error_chunk(serving, stack, nats_server):
    gateway, _, worker = await serving()
    bus = await client(stack, nats_server.url)
    good = {"v": 1, "model": "sql", "prompt": "hi", "max_tokens": 2}
    payloads = [
        b"\x81\xa1x" + b"\x91" * 100_000 + b"\xc0",  # 100,000 levels: past msgpack's own stack
        msgpack.packb({**good, "prompt": [[[[[[1]]]]]] * 2}),
        msgpack.packb({**good, "stop": [[[]]] * 500}),
        msgpack.packb({**good, "prompt": "xyz"}).replace(b"\xa3xyz", b"\xa3\xed\xa0\x80"),  # a UTF-8 surrogate
        msgpack.packb({**good, "top_k": 2**64 - 1}),
        msgpack.packb({**good, "seed": 2**64 - 1}),
        msgpack.packb({**good, "max_tokens": 2**63}),
        msgpack.packb({**good, "prompt": [1, 2**64 - 1]}),
        msgpack.packb({**good, "temperature": float("nan")}),
        msgpack.packb({**good, "prompt": None, "messages": [{"role": "x" * 100_000, "content": "hi"}]}),
        msgpack.packb({**good, "v": ["x" * 10_000] * 100}),  # quoted in the error: it stays short
    ]
    for payload in payloads:
        chunks = await nats_generate(bus, payload)
        assert len(chunks) == 1 and chunks[0].final and chunks[0].error.code in ("bad_payload", "unsupported_version")
        assert len(chunks[0].error.message) < 1000, chunks[0].error.message
    chunks = await nats_generate(bus, GenerateRequest(model="sql", prompt="fine", max_tokens=2))
    assert chunks[-1].finish_reason == "length" and len(worker.submits) == 1
    assert not gateway.relay.active

