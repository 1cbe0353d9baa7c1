"""The whole stack through its two public APIs: nats-py on caraserve.v1.generate, and the official openai client.

Decoding is greedy, so one prompt must give the same text whichever client, API shape
(completion or chat) and streaming mode asks for it.
"""

from __future__ import annotations

import asyncio

import openai
import pytest

from shared.schemas import ChatMessage, GenerateRequest
from tests.e2e.clients import generate, model_names, openai_client

pytestmark = pytest.mark.timeout(120)

PROMPT = "The small model reads a sentence and"
MAX_TOKENS = 12
GREEDY = {"temperature": 0, "max_tokens": MAX_TOKENS, "extra_body": {"ignore_eos": True}}


def test_models_list_the_base_model_and_every_adapter_with_its_parent(e2e_stack, tiny_adapters):
    models = {m.id: m for m in openai_client(e2e_stack.http_url).models.list().data}
    base, adapters = model_names(e2e_stack.http_url)
    assert adapters == sorted(tiny_adapters)
    assert models[base].parent is None
    assert all(models[name].parent == base for name in adapters)
    assert set(models) == {base, *adapters}


def test_openai_completions_stream_and_not_agree(e2e_stack):
    client = openai_client(e2e_stack.http_url)
    base, adapters = model_names(e2e_stack.http_url)
    for model in (base, adapters[0]):
        whole = client.completions.create(model=model, prompt=PROMPT, **GREEDY)
        assert whole.object == "text_completion" and whole.model == model
        assert whole.choices[0].finish_reason == "length"
        assert whole.usage.completion_tokens == MAX_TOKENS and whole.usage.prompt_tokens > 0
        events = list(client.completions.create(model=model, prompt=PROMPT, stream=True,
                                                stream_options={"include_usage": True}, **GREEDY))
        text = "".join(c.choices[0].text for c in events if c.choices)
        assert text == whole.choices[0].text and text
        assert [c.choices[0].finish_reason for c in events if c.choices][-1] == "length"
        assert events[-1].usage.completion_tokens == MAX_TOKENS
        assert len({c.id for c in events}) == 1


def test_an_adapter_changes_the_output(e2e_stack):
    client = openai_client(e2e_stack.http_url)
    base, adapters = model_names(e2e_stack.http_url)
    texts = {m: client.completions.create(model=m, prompt=PROMPT, **GREEDY).choices[0].text
             for m in (base, *adapters)}
    assert len(set(texts.values())) > 1, texts


def test_openai_chat_completions_stream_and_not_agree(e2e_stack):
    client = openai_client(e2e_stack.http_url)
    base, adapters = model_names(e2e_stack.http_url)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model=adapters[-1], messages=messages, **GREEDY)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == MAX_TOKENS
    events = list(client.chat.completions.create(model=adapters[-1], messages=messages, stream=True, **GREEDY))
    assert events[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in events)
    assert text == whole.choices[0].message.content and text
    assert events[-1].choices[0].finish_reason == "length"


def test_openai_errors_are_typed(e2e_stack):
    client = openai_client(e2e_stack.http_url)
    base, _ = model_names(e2e_stack.http_url)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=base, prompt="", max_tokens=2)


async def test_nats_generate_streams_and_collects_the_same_text_as_http(e2e_stack, nats_client):
    base, adapters = model_names(e2e_stack.http_url)
    model = adapters[0]
    request = dict(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    streamed, collected = await asyncio.gather(
        generate(nats_client, GenerateRequest(request_id="e2e-nats-stream", stream=True, **request)),
        generate(nats_client, GenerateRequest(request_id="e2e-nats-whole", stream=False, **request)))
    assert [c.index for c in streamed.chunks] == list(range(len(streamed.chunks)))
    assert sum(c.final for c in streamed.chunks) == 1 and len(streamed.chunks) > 1
    assert {c.request_id for c in streamed.chunks} == {"e2e-nats-stream"}
    assert len(streamed.token_ids) == MAX_TOKENS and streamed.final.finish_reason == "length"
    assert streamed.final.usage.completion_tokens == MAX_TOKENS
    assert len(collected.chunks) == 1 and collected.final.request_id == "e2e-nats-whole"
    assert collected.token_ids == streamed.token_ids and collected.text == streamed.text
    http = await asyncio.to_thread(openai_client(e2e_stack.http_url).completions.create, model=model,
                                   prompt=PROMPT, **GREEDY)
    assert http.choices[0].text == streamed.text


async def test_nats_chat_and_typed_errors(e2e_stack, nats_client):
    base, _ = model_names(e2e_stack.http_url)
    chat = await generate(nats_client, GenerateRequest(
        model=base, messages=[ChatMessage(role="user", content="Hello")], max_tokens=4, temperature=0,
        ignore_eos=True, request_id="e2e-nats-chat"))
    assert chat.final.finish_reason == "length" and len(chat.token_ids) == 4
    unknown = await generate(nats_client, GenerateRequest(model="nope", prompt="hi", request_id="e2e-nats-404"))
    assert len(unknown.chunks) == 1 and unknown.final.finish_reason == "error"
    assert unknown.final.error.code == "model_not_found" and unknown.final.request_id == "e2e-nats-404"
