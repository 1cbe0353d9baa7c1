"""Turn a GenerateRequest into a routed request: auth, model lookup, tokenization, validation.

Validation follows OpenAI: an unknown model (or one the tenant may not use) is 404
``model_not_found``; an empty prompt is 400; a prompt that leaves no room in the context,
or an explicit ``max_tokens`` that does not fit after the prompt, is 400
``context_length_exceeded``. Without ``max_tokens`` a completion gets
``default_max_tokens`` (capped to what fits) and a chat completion the rest of the context.

Tokenizing is the one CPU-heavy step of the gateway, so a prompt is first refused by size:
one that has more than ``MAX_CHARS_PER_TOKEN`` characters per token of the context cannot fit
(real text averages about 4; 64 is generous, e.g. for long whitespace runs), and gets
``context_length_exceeded`` without being tokenized. A prompt that passes is tokenized on a
worker thread when it is longer than ``INLINE_TOKENIZE_CHARS`` (the tokenizer releases the GIL),
so the event loop pays only for handing over the result under the GIL (about 0.1 µs per token:
a few ms for a full context); shorter ones are tokenized inline, cheaper than the thread hop.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.gateway.fleet_view import FleetView
from services.gateway.tenancy import Tenancy
from shared.schemas import ChatMessage, GenerateRequest, Sampling, ServiceError
from shared.tokenizer import ChatTemplateError, apply_chat_template, encode_prompt

MAX_CHARS_PER_TOKEN = 64
INLINE_TOKENIZE_CHARS = 2048


@dataclass
class PreparedRequest:
    """A validated request, ready to route."""

    request_id: str
    tenant: str
    model: str  # the ``model`` field as the client sent it (echoed in responses)
    adapter: str | None
    rank: int
    prompt_token_ids: list[int]
    sampling: Sampling
    stream: bool
    chat: bool
    created: int


class RequestPreparer:
    """Validates and tokenizes requests for one base model."""

    def __init__(self, tokenizer: Any, fleet: FleetView, tenancy: Tenancy, max_model_len: int,
                 default_max_tokens: int = 16) -> None:
        self.tokenizer = tokenizer
        self.fleet = fleet  # the served models: the base model and the workers' adapters
        self.tenancy = tenancy
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        self.vocab_size = len(tokenizer)

    async def prepare(self, request: GenerateRequest, api_key: str | None = None) -> PreparedRequest:
        """Validate ``request`` (``api_key`` overrides the request's own); ServiceError if invalid."""
        tenant = self.tenancy.authenticate(api_key if api_key is not None else request.api_key)
        adapter = self.fleet.resolve(request.model)
        if not self.tenancy.may_use(tenant, adapter):
            raise ServiceError("model_not_found", f"the model {request.model!r} does not exist")
        chat = request.messages is not None
        prompt = await self._tokenize(request)
        sampling = Sampling(max_tokens=self._max_tokens(request, len(prompt), chat),
                            temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                            seed=request.seed, stop=request.stop_list(), ignore_eos=request.ignore_eos)
        request_id = request.request_id or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        return PreparedRequest(request_id=request_id, tenant=tenant, model=request.model, adapter=adapter,
                               rank=self.fleet.rank_of(adapter), prompt_token_ids=prompt, sampling=sampling,
                               stream=request.stream, chat=chat, created=int(time.time()))

    async def _tokenize(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            ids = await self._tokenize_chat(request.messages)
        elif isinstance(request.prompt, str):
            if not request.prompt:
                raise ServiceError("invalid_request", "the prompt must not be empty")
            self._check_size(len(request.prompt), "prompt")
            ids = await _off_loop(len(request.prompt), encode_prompt, self.tokenizer, request.prompt)
        else:
            ids = list(request.prompt or [])
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise ServiceError("invalid_request", f"token id {bad[0]} is outside the vocabulary "
                                                      f"(size {self.vocab_size})")
        if not ids:
            raise ServiceError("invalid_request", "the prompt must not be empty")
        if len(ids) >= self.max_model_len:
            raise ServiceError("context_length_exceeded",
                               f"This model's maximum context length is {self.max_model_len} tokens. However, "
                               f"your prompt has {len(ids)} tokens, leaving no room for a completion.")
        return ids

    async def _tokenize_chat(self, messages: list[ChatMessage]) -> list[int]:
        if not messages:
            raise ServiceError("invalid_request", "messages must not be empty")
        chars = sum(len(m.content) for m in messages)
        self._check_size(chars, "messages")
        try:
            return await _off_loop(chars, apply_chat_template, self.tokenizer, [m.to_dict() for m in messages])
        except ChatTemplateError as exc:
            raise ServiceError("invalid_request", str(exc)) from exc

    def _check_size(self, chars: int, what: str) -> None:
        """Refuse, before tokenizing, a text too long to fit the context at any plausible density."""
        limit = self.max_model_len * MAX_CHARS_PER_TOKEN
        if chars > limit:
            raise ServiceError("context_length_exceeded",
                               f"This model's maximum context length is {self.max_model_len} tokens. However, "
                               f"your {what} has {chars} characters, more than the {limit} that could fit "
                               f"(at most {MAX_CHARS_PER_TOKEN} characters per token).")

    def _max_tokens(self, request: GenerateRequest, prompt_tokens: int, chat: bool) -> int:
        room = self.max_model_len - prompt_tokens
        if request.max_tokens is None:
            return room if chat else min(self.default_max_tokens, room)
        if prompt_tokens + request.max_tokens > self.max_model_len:
            raise ServiceError("context_length_exceeded",
                               f"This model's maximum context length is {self.max_model_len} tokens. However, "
                               f"you requested {prompt_tokens + request.max_tokens} tokens ({prompt_tokens} in "
                               f"the {'messages' if chat else 'prompt'}, {request.max_tokens} in the "
                               "completion). Please reduce the length of the prompt or the completion.")
        return request.max_tokens


async def _off_loop(chars: int, tokenize: Callable[..., list[int]], *args: Any) -> list[int]:
    """``tokenize(*args)`` for a text of ``chars`` characters: inline when short, else on a thread."""
    if chars <= INLINE_TOKENIZE_CHARS:
        return tokenize(*args)
    return await asyncio.to_thread(tokenize, *args)
