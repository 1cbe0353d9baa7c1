"""OpenAI wire shapes: request bodies in, completion / chat-completion objects and SSE events out."""

from __future__ import annotations

import json
import reprlib
from typing import Any

from services.gateway.prepare import PreparedRequest
from shared.schemas import Chunk, ErrorInfo, GenerateRequest, SchemaError, ServiceError

SAMPLING_FIELDS = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "stream")
# Accepted only at their neutral value (we do not implement them).
NEUTRAL = {"n": (1, None), "best_of": (1, None), "echo": (False, None), "logprobs": (None, False, 0),
           "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "suffix": (None, ""),
           "logit_bias": (None,), "tools": (None,), "tool_choice": (None, "none")}
# ``stream_options`` is read by :func:`include_usage`; any other field (user, metadata...) is ignored.


def generate_request(body: Any, chat: bool) -> GenerateRequest:
    """The GenerateRequest an OpenAI ``/v1/completions`` or ``/v1/chat/completions`` body asks for."""
    if not isinstance(body, dict):
        raise ServiceError("invalid_request", "the request body must be a JSON object")
    for key, neutral in NEUTRAL.items():
        if key in body and body[key] not in neutral and not (key == "logit_bias" and body[key] == {}):
            raise ServiceError("invalid_request", f"{key}={reprlib.repr(body[key])} is not supported")
    fields = {k: body[k] for k in SAMPLING_FIELDS if k in body and body[k] is not None}
    if chat:
        if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
            fields["max_tokens"] = body["max_completion_tokens"]
        fields["messages"] = _messages(body.get("messages"))
    else:
        fields["prompt"] = _prompt(body.get("prompt"))
    fields.setdefault("stream", False)
    fields["v"] = GenerateRequest.SCHEMA_VERSION
    try:
        return GenerateRequest.from_envelope(fields)
    except SchemaError as exc:
        raise ServiceError("invalid_request", str(exc)) from exc


def include_usage(body: dict[str, Any]) -> bool:
    """Whether a streamed response ends with a usage event (``stream_options.include_usage``).

    Checked with the rest of the body, before the request starts, so a malformed value is a 400
    that leaves nothing running.
    """
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ServiceError("invalid_request", f"stream_options must be an object, got {_json_type(options)}")
    value = options.get("include_usage")
    if value is not None and not isinstance(value, bool):
        raise ServiceError("invalid_request",
                           f"stream_options.include_usage must be a boolean, got {_json_type(value)}")
    return bool(value)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def _prompt(prompt: Any) -> Any:
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise ServiceError("invalid_request", "batched prompts are not supported; send one prompt per request")
        return prompt[0]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        return prompt[0]
    if prompt is None:
        raise ServiceError("invalid_request", "prompt is required")
    return prompt


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ServiceError("invalid_request", "messages must be a non-empty list")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ServiceError("invalid_request", f"messages[{i}] must be an object")
        out.append({"role": message.get("role"), "content": _text_content(message.get("content"), i)})
    return out


def _text_content(content: Any, i: int) -> Any:
    """A message's content as text (OpenAI also allows a list of text parts)."""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ServiceError("invalid_request", f"messages[{i}].content: only text parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    return "" if content is None else content


def error_body(info: ErrorInfo) -> dict[str, Any]:
    return {"error": {"message": info.message, "type": info.type, "code": info.code, "param": None}}


def usage_body(chunk: Chunk) -> dict[str, Any] | None:
    """OpenAI ``usage``, plus CaraServe's ``prefill_lora`` for a LoRA request (how its prefill got its
    deltas: ``cpu_layers`` from the CPU prefill pool, ``device_layers``, ``waited_ms`` for its load)."""
    usage = chunk.usage
    if usage is None:
        return None
    body: dict[str, Any] = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                            "total_tokens": usage.total_tokens}
    if usage.prefill_lora is not None:
        body["prefill_lora"] = usage.prefill_lora.to_dict()
    return body


def response_body(prepared: PreparedRequest, final: Chunk) -> dict[str, Any]:
    """The non-streaming response for the request's whole output (``final`` from ``collect``)."""
    if prepared.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": final.text}, "logprobs": None,
                  "finish_reason": final.finish_reason}
    else:
        choice = {"index": 0, "text": final.text, "logprobs": None, "finish_reason": final.finish_reason}
    return {**_header(prepared, False), "choices": [choice], "usage": usage_body(final)}


def _header(prepared: PreparedRequest, streaming: bool) -> dict[str, Any]:
    if prepared.chat:
        kind = "chat.completion.chunk" if streaming else "chat.completion"
    else:
        kind = "text_completion"
    return {"id": prepared.request_id, "object": kind, "created": prepared.created, "model": prepared.model}


def sse_events(prepared: PreparedRequest, chunk: Chunk, first: bool, include_usage: bool) -> list[bytes]:
    """The SSE ``data:`` events for one chunk (ending with ``[DONE]`` after the final one)."""
    events: list[dict[str, Any]] = []
    if chunk.error is not None:
        events.append(error_body(chunk.error))
    else:
        finish = chunk.finish_reason
        if prepared.chat:
            delta: dict[str, Any] = {"content": chunk.text} if chunk.text or not finish else {}
            if first:
                delta = {"role": "assistant", **delta}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": finish}
        events.append({**_header(prepared, True), "choices": [choice]})
        if chunk.final and include_usage:
            events.append({**_header(prepared, True), "choices": [], "usage": usage_body(chunk)})
    lines = [b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events]
    if chunk.final:
        lines.append(b"data: [DONE]\n\n")
    return lines
