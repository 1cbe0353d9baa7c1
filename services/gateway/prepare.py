"""Turn a GenerateRequest into a routed request: auth, model lookup, tokenization, validation.

Validation follows OpenAI: an unknown model (or one the tenant may not use) is 404
``model_not_found``; an empty prompt is 400; a prompt that leaves no room in the context,
or an explicit ``max_tokens`` that does not fit after the prompt, is 400
``context_length_exceeded``. Without ``max_tokens`` a completion gets
``default_max_tokens`` (capped to what fits) and a chat completion the rest of the context.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from services.gateway.catalog import Catalog
from services.gateway.tenancy import Tenancy
from shared.schemas import GenerateRequest, Sampling, ServiceError
from shared.tokenizer import ChatTemplateError, apply_chat_template, encode_prompt


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

    def __init__(self, tokenizer: Any, catalog: Catalog, tenancy: Tenancy, max_model_len: int,
                 default_max_tokens: int = 16) -> None:
        self.tokenizer = tokenizer
        self.catalog = catalog
        self.tenancy = tenancy
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        self.vocab_size = len(tokenizer)

    def prepare(self, request: GenerateRequest, api_key: str | None = None) -> PreparedRequest:
        """Validate ``request`` (``api_key`` overrides the request's own); ServiceError if invalid."""
        tenant = self.tenancy.authenticate(api_key if api_key is not None else request.api_key)
        adapter = self.catalog.resolve(request.model)
        if not self.tenancy.may_use(tenant, adapter):
            raise ServiceError("model_not_found", f"the model {request.model!r} does not exist")
        chat = request.messages is not None
        prompt = self._tokenize(request)
        sampling = Sampling(max_tokens=self._max_tokens(request, len(prompt), chat),
                            temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                            seed=request.seed, stop=request.stop_list(), ignore_eos=request.ignore_eos)
        request_id = request.request_id or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        return PreparedRequest(request_id=request_id, tenant=tenant, model=request.model, adapter=adapter,
                               rank=self.catalog.rank_of(adapter), prompt_token_ids=prompt, sampling=sampling,
                               stream=request.stream, chat=chat, created=int(time.time()))

    def _tokenize(self, request: GenerateRequest) -> list[int]:
        if request.messages is not None:
            if not request.messages:
                raise ServiceError("invalid_request", "messages must not be empty")
            try:
                ids = apply_chat_template(self.tokenizer, [m.to_dict() for m in request.messages])
            except ChatTemplateError as exc:
                raise ServiceError("invalid_request", str(exc)) from exc
        elif isinstance(request.prompt, str):
            if not request.prompt:
                raise ServiceError("invalid_request", "the prompt must not be empty")
            ids = encode_prompt(self.tokenizer, request.prompt)
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
