"""Wire schemas: every message round-trips; malformed payloads are rejected with a typed SchemaError."""

from __future__ import annotations

import msgpack
import pytest

from shared import subjects
from shared.schemas import (AdapterInfo, AdapterList, AdapterListRequest, AdapterLoad, AdapterUnload, CancelRequest,
                            ChatMessage, Chunk, ErrorInfo, ErrorReply, GenerateRequest, Message, RemoteError,
                            RequestLoad, RouteReply, RouteRequest, Sampling, SchemaError, SubmitAck, Usage,
                            WorkerState, WorkerSubmit, decode_reply, error_info, http_status)
from shared.schemas.names import request_key

SAMPLING = Sampling(max_tokens=8, temperature=0.7, top_p=0.9, top_k=40, seed=7, stop=["\n"], stop_token_ids=[2],
                    ignore_eos=True)
ROUTE = RouteRequest(request_id="r-1", model="base", adapter="sql", prompt_token_ids=[1, 2, 3],
                     generated_token_ids=[9], sampling=SAMPLING, reply_inbox="_INBOX.abc.7", tenant="acme",
                     attempt=1, deadline_ms=500, exclude_workers=["w1"])

EXAMPLES: list[Message] = [
    GenerateRequest(model="sql", prompt="hello", max_tokens=4, temperature=0.0, stop=["x", "y"], seed=3,
                    request_id="abc", api_key="k", stream=False),
    GenerateRequest(model="base", messages=[ChatMessage(role="user", content="hi")], stop="."),
    GenerateRequest(model="base", prompt=[1, 2, 3]),
    CancelRequest(request_id="abc"),
    Chunk(request_id="abc", index=0, token_ids=[5, 6], text="hi"),
    Chunk(request_id="abc", index=3, finish_reason="length", usage=Usage(prompt_tokens=3, completion_tokens=4,
                                                                         total_tokens=7)),
    Chunk(request_id="abc", index=0, finish_reason="error", error=error_info("no_capacity", "none")),
    ErrorReply(error=error_info("bad_payload", "broken")),
    ROUTE,
    RouteReply(request_id="r-1", worker_id="w0"),
    RouteReply(request_id="r-1", worker_id="w0", state_seq=12, instance="0123456789abcdef"),
    WorkerSubmit.from_route(ROUTE, "w0"),
    SubmitAck(request_id="r-1", worker_id="w0", state_seq=12),
    SubmitAck(request_id="r-1", worker_id="w0", state_seq=12, instance="0123456789abcdef"),
    WorkerState(worker_id="w0", model="base", backend="mbgmv",
                running=[RequestLoad(key=request_key("a"), adapter="sql", rank=8, prompt_tokens=10, generated_tokens=2,
                                     remaining_tokens=5)],
                queued=[RequestLoad(key=request_key("b"))], adapters=[AdapterInfo(name="sql", rank=8, level="device",
                                                                            pinned=True)],
                free_kv_blocks=10, total_kv_blocks=20, block_size=16, max_batch_size=32, max_model_len=2048,
                seq=4, timestamp=1.5, max_queued=64, instance="0123456789abcdef"),
    AdapterLoad(name="sql", path="/adapters/sql", pinned=True),
    AdapterUnload(name="sql"),
    AdapterListRequest(),
    AdapterList(worker_id="w0", adapters=[AdapterInfo(name="sql", rank=8, level="host")]),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message):
    data = message.encode()
    body = msgpack.unpackb(data)
    assert body["v"] == message.SCHEMA_VERSION == 1 and body["kind"] == message.KIND
    assert type(message).decode(data) == message


def test_kinds_are_distinct():
    kinds = [cls.KIND for cls in {type(m) for m in EXAMPLES}]
    assert len(kinds) == len(set(kinds)) and all(kinds)


def pack(**fields):
    return msgpack.packb({"v": 1, **fields})


CHUNK = {"request_id": "r", "index": 0}
GENERATE = {"model": "m", "prompt": "x"}


@pytest.mark.parametrize("cls, payload, where", [
    (Chunk, b"", "msgpack"),
    (Chunk, b"\xc1", "msgpack"),
    (Chunk, msgpack.packb([1, 2]), "map"),
    (Chunk, pack(**CHUNK, kind="route_request"), "kind"),
    (Chunk, pack(index=0), "request_id"),
    (Chunk, pack(**CHUNK, zzz=1), "zzz"),
    (Chunk, pack(request_id="r", index=True), "index"),
    (Chunk, pack(request_id="r", index=-1), "index"),
    (Chunk, pack(request_id="bad id!", index=0), "request_id"),
    (Chunk, pack(**CHUNK, token_ids=[1, "2"]), "token_ids[1]"),
    (Chunk, pack(**CHUNK, token_ids=[1, -2]), "token_ids[1]"),
    (Chunk, pack(**CHUNK, finish_reason="done"), "finish_reason"),
    (Chunk, pack(**CHUNK, finish_reason="error"), "error"),
    (Chunk, pack(**CHUNK, error={"type": "server_error", "code": "x", "message": "m"}), "error"),
    (Chunk, pack(**CHUNK, usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 3}), "total_tokens"),
    (Chunk, pack(**CHUNK, text=b"bytes"), "text"),
    (GenerateRequest, pack(model="m"), "prompt"),
    (GenerateRequest, pack(model="m", prompt="x", messages=[]), "prompt"),
    (GenerateRequest, pack(**GENERATE, temperature=2.5), "temperature"),
    (GenerateRequest, pack(**GENERATE, temperature=float("nan")), "temperature"),
    (GenerateRequest, pack(**GENERATE, top_p=0.0), "top_p"),
    (GenerateRequest, pack(**GENERATE, top_k=-2), "top_k"),
    (GenerateRequest, pack(**GENERATE, max_tokens=0), "max_tokens"),
    (GenerateRequest, pack(**GENERATE, stop=[""]), "stop"),
    (GenerateRequest, pack(**GENERATE, stop=["s"] * 17), "stop"),
    (GenerateRequest, pack(**GENERATE, stream="yes"), "stream"),
    (GenerateRequest, pack(model="m", messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
    (GenerateRequest, pack(model="m", prompt={"a": 1}), "prompt"),
    (RouteRequest, pack(request_id="r", model="m", prompt_token_ids=[], sampling={"max_tokens": 1},
                        reply_inbox="i"), "prompt_token_ids"),
    (RouteRequest, pack(request_id="r", model="m", prompt_token_ids=[1], sampling={"max_tokens": 1},
                        reply_inbox="bad inbox"), "reply_inbox"),
    (RouteRequest, pack(request_id="r", model="m", prompt_token_ids=[1], generated_token_ids=[1, 2],
                        sampling={"max_tokens": 2}, reply_inbox="i"), "generated_token_ids"),
    (WorkerState, pack(worker_id="w.0", model="m", backend="b"), "worker_id"),
    (WorkerState, pack(worker_id="w", model="m", backend="b", free_kv_blocks=5, total_kv_blocks=1), "free_kv"),
    (WorkerState, pack(worker_id="w", model="m", backend="b", adapters=[{"name": "a", "rank": 8,
                                                                          "level": "cloud"}]), "level"),
    (WorkerState, pack(worker_id="w", model="m", backend="b", max_queued=-1), "max_queued"),
    (WorkerState, pack(worker_id="w", model="m", backend="b", instance="not hex"), "instance"),
    (WorkerState, pack(worker_id="w", model="m", backend="b", running=[{"request_id": "r"}]), "running[0]"),
    (AdapterLoad, pack(name="../x", path="p"), "name"),
])
def test_malformed_payloads_are_rejected_with_the_field_named(cls, payload, where):
    with pytest.raises(SchemaError) as raised:
        cls.decode(payload)
    assert where in str(raised.value)
    assert raised.value.code == "bad_payload"


def test_worker_state_shows_request_keys_not_ids_and_old_peers_still_decode():
    key = request_key("chatcmpl-123")
    assert len(key) == 16 and key == request_key("chatcmpl-123") and key != request_key("chatcmpl-124")
    assert "chatcmpl-123" not in key
    state = WorkerState(worker_id="w", model="m", backend="b", running=[RequestLoad(key=key)], max_batch_size=4,
                        max_queued=8)
    assert state.request_keys() == {key} and state.capacity == 12
    old = WorkerState.decode(pack(worker_id="w", model="m", backend="b"))  # a peer without the new fields
    assert (old.max_queued, old.instance) == (0, "")
    assert RouteReply.decode(pack(request_id="r", worker_id="w")).state_seq == 0
    assert SubmitAck.decode(pack(request_id="r", worker_id="w", state_seq=3)).instance == ""


def test_none_fields_are_left_off_the_wire_and_other_defaults_are_sent():
    """The wire shape clients read: ``finish_reason``, ``usage``... only when set; ``text`` and
    ``token_ids`` always."""
    body = msgpack.unpackb(Chunk(request_id="r", index=0).encode())
    assert body == {"kind": "chunk", "v": 1, "request_id": "r", "index": 0, "token_ids": [], "text": ""}


def test_a_refused_choice_lists_the_allowed_values():
    with pytest.raises(SchemaError) as raised:
        GenerateRequest.decode(pack(model="m", messages=[{"role": "r" * 10_000, "content": "x"}]))
    assert raised.value.path == "messages[0].role" and "must be one of assistant, developer, system, tool, user" \
        in str(raised.value) and len(str(raised.value)) < 300


def test_unknown_version_is_its_own_error_code():
    with pytest.raises(SchemaError) as raised:
        Chunk.decode(msgpack.packb({"v": 2, **CHUNK}))
    assert raised.value.code == "unsupported_version" and raised.value.path == "v"


def test_a_missing_version_means_the_current_one():
    """What the README's NATS example sends: no ``v``."""
    request = GenerateRequest.decode(msgpack.packb({"model": "m", "prompt": "hi"}))
    assert (request.model, request.prompt) == ("m", "hi")
    assert CancelRequest.decode(msgpack.packb({"request_id": "r"})).request_id == "r"


def test_decode_reply_tells_errors_from_answers():
    assert decode_reply(RouteReply(request_id="r", worker_id="w").encode(), RouteReply).worker_id == "w"
    with pytest.raises(RemoteError) as raised:
        decode_reply(ErrorReply(error=error_info("overloaded", "busy")).encode(), RouteReply)
    assert raised.value.info == ErrorInfo(type="rate_limit_error", code="overloaded", message="busy")
    with pytest.raises(SchemaError):
        decode_reply(SubmitAck(request_id="r", worker_id="w", state_seq=1).encode(), RouteReply)


def test_error_codes_map_to_openai_types_and_http_statuses():
    assert http_status(error_info("model_not_found", "")) == 404
    assert http_status(error_info("invalid_api_key", "")) == 401
    assert http_status(error_info("overloaded", "")) == 429
    assert http_status(error_info("no_capacity", "")) == 503
    assert http_status(error_info("context_length_exceeded", "")) == 400
    with pytest.raises(KeyError):
        error_info("no_such_code", "")


def test_subjects():
    assert subjects.GENERATE == "caraserve.v1.generate" and subjects.ROUTE == "caraserve.v1.route"
    assert subjects.worker_submit("w-1") == "caraserve.v1.worker.w-1.submit"
    assert subjects.worker_cancel("w-1") == "caraserve.v1.worker.w-1.cancel"
    assert subjects.state("w_2") == "caraserve.v1.state.w_2" and subjects.STATE_ALL == "caraserve.v1.state.*"
    assert subjects.worker_id_of_state("caraserve.v1.state.w_2") == "w_2"
    for bad in ("", "a.b", "a*", "a b", ">", "x" * 65):
        with pytest.raises(subjects.SubjectError):
            subjects.worker_submit(bad)
    with pytest.raises(subjects.SubjectError):
        subjects.worker_id_of_state("caraserve.v1.route")
