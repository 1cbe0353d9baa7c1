"""NATS with credentials and least privilege (issue 13 §3), against a real nats-server with users.

Every service (the real gateway and scheduler, a fake-but-real worker) logs in with its own
credentials; NATS API clients may publish only ``generate``, ``cancel`` and ``adapters.list``
and read only their own inboxes; a cancel takes effect only for the requester.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest

from shared import subjects
from shared.bus import Bus, connect
from shared.nats_auth import Credentials, NatsUser, new_user, read_credentials, write_credentials
from shared.nats_server import NatsServer
from shared.schemas import (AdapterInfo, AdapterList, AdapterListRequest, AdapterUnload, CancelRequest, Chunk,
                            GenerateRequest, WorkerState)
from tests.service.helpers import make_adapter_dir, start_gateway, start_scheduler, start_worker, wait_until

pytestmark = pytest.mark.timeout(60)

ADAPTERS = {"sql": 8}
WORKER_ADAPTERS = [AdapterInfo(name="sql", rank=8, level="host")]
IDENTITIES = {"gateway": ("gateway", "gateway"), "scheduler": ("scheduler", "scheduler-0"),
              "w1": ("gpu_worker", "w1"), "pool1": ("cpu_prefill", "w1"), "alice": ("client", "alice"), "bob": ("client", "bob"),
              "operator": ("operator", "test")}


@dataclass
class Secured:
    """A nats-server that requires logins, and the credential file of each identity."""

    server: NatsServer
    files: dict[str, Path]

    @property
    def url(self) -> str:
        return self.server.url

    def creds(self, key: str) -> Credentials:
        return read_credentials(self.files[key])


@pytest.fixture
def secured(tmp_path):
    users: dict[str, NatsUser] = {key: new_user(role, name) for key, (role, name) in IDENTITIES.items()}
    files = {key: write_credentials(user.credentials, tmp_path / "creds" / f"{key}.json")
             for key, user in users.items()}
    with NatsServer(users=list(users.values())) as server:
        yield Secured(server, files)


class Violations:
    """The errors nats-server reported to one raw connection (nats-py's error_cb)."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def record(self, exc: Exception) -> None:
        self.errors.append(str(exc))

    async def wait_for(self, fragment: str) -> None:
        fragment = fragment.lower()  # nats-py lower-cases the server's message
        await wait_until(lambda: any(fragment in e.lower() for e in self.errors), timeout_s=10)


async def raw_client(stack: contextlib.AsyncExitStack, secured: Secured, key: str) -> tuple[nats.NATS, Violations]:
    violations = Violations()
    nc = await nats.connect(secured.url, error_cb=violations.record, **secured.creds(key).connect_options())
    stack.push_async_callback(nc.close)
    return nc, violations


async def services(stack: contextlib.AsyncExitStack, secured: Secured, model_dir: Path, adapter_dir: Path,
                   **gateway_overrides):
    """Scheduler, gateway and one worker, each with its own credentials."""
    await start_scheduler(stack, secured.url, nats_creds=str(secured.files["scheduler"]), name="scheduler-0")
    gateway = await start_gateway(stack, secured.url, model_dir, adapter_dir=str(adapter_dir),
                                  nats_creds=str(secured.files["gateway"]), **gateway_overrides)
    worker = await start_worker(stack, secured.url, "w1", model=gateway.model_name, adapters=WORKER_ADAPTERS,
                                credentials=secured.creds("w1"), step_s=0.05)
    await wait_until(lambda: "w1" in gateway.fleet.live_workers())
    return gateway, worker


@pytest.fixture
def adapter_dir(tmp_path):
    return make_adapter_dir(tmp_path / "adapters", ADAPTERS)


async def open_stream(bus: Bus, request: GenerateRequest):
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    await bus.nc.publish(subjects.GENERATE, request.encode(), reply=inbox)
    return inbox, sub


async def rest_of(sub, first: Chunk) -> list[Chunk]:
    chunks = [first]
    while not chunks[-1].final:
        chunks.append(Chunk.decode((await sub.next_msg(timeout=15)).data))
    return chunks


async def test_anonymous_and_wrong_passwords_are_refused(secured):
    with pytest.raises(ConnectionError, match="Authorization"):
        await connect(secured.url, "anonymous", connect_deadline_s=2)
    wrong = Credentials(secured.creds("alice").user, "not-the-password", "_INBOX.client.alice")
    with pytest.raises(ConnectionError, match="Authorization"):
        await connect(secured.url, "guesser", credentials=wrong, connect_deadline_s=2)


@pytest.mark.parametrize("subject", [">", subjects.STATE_ALL, "_INBOX.client.bob.>", "_INBOX.gw.>",
                                     subjects.ROUTE, subjects.GENERATE])
async def test_a_client_reads_only_its_own_inboxes(secured, stack, subject):
    operator = await Bus.open(secured.url, "operator", stack, credentials=secured.creds("operator"))
    alice, violations = await raw_client(stack, secured, "alice")
    sub = await alice.subscribe(subject)
    await violations.wait_for(f'permissions violation for subscription to "{subject}"')
    await operator.nc.publish(subject.replace(">", "x").replace("*", "w1"), b"secret")
    await operator.nc.flush()
    with pytest.raises(nats.errors.TimeoutError):
        await sub.next_msg(timeout=0.3)
    own = alice.new_inbox()  # its own inboxes do work
    assert own.startswith("_INBOX.client.alice.")
    mine = await alice.subscribe(own)
    await alice.flush()
    assert await delivered(operator, mine, own)


async def delivered(sender: Bus, sub, subject: str, timeout_s: float = 10.0) -> bool:
    """True once a message ``sender`` publishes on ``subject`` reaches ``sub``. Published again
    until then: under load, a flush's PONG may come before the server registered the
    subscription, and core NATS drops a message with no subscriber yet."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        await sender.nc.publish(subject, b"hello")
        with contextlib.suppress(nats.errors.TimeoutError):
            return (await sub.next_msg(timeout=0.5)).data == b"hello"
    return False


@pytest.mark.parametrize("subject", [subjects.ROUTE, subjects.worker_submit("w1"), subjects.worker_cancel("w1"),
                                     subjects.state("w1"), subjects.ADAPTERS_UNLOAD, subjects.ADAPTERS_LOAD])
async def test_a_client_cannot_publish_internal_subjects(secured, stack, subject):
    operator = await Bus.open(secured.url, "operator", stack, credentials=secured.creds("operator"))
    seen = await operator.nc.subscribe(subject)
    await operator.nc.flush()
    alice, violations = await raw_client(stack, secured, "alice")
    await alice.publish(subject, AdapterUnload(name="sql").encode())
    await violations.wait_for(f'permissions violation for publish to "{subject}"')
    with pytest.raises(nats.errors.TimeoutError):
        await seen.next_msg(timeout=0.3)
    await alice.publish(subjects.GENERATE, b"allowed")  # the public subject gets through
    await alice.flush()
    assert not any("generate" in e for e in violations.errors)


async def test_a_cpu_prefill_pool_may_only_say_hello_and_heartbeat(secured, stack):
    pool, violations = await raw_client(stack, secured, "pool1")
    await pool.publish(subjects.GENERATE, b"not a client")
    await violations.wait_for(f'permissions violation for publish to "{subjects.GENERATE}"')
    await pool.subscribe(subjects.STATE_ALL)
    await violations.wait_for("permissions violation for subscription")
    await pool.publish(subjects.cpu_prefill_hello("w2"), b"another worker's pool")
    await violations.wait_for(f'permissions violation for publish to "{subjects.cpu_prefill_hello("w2")}"')
    before = len(violations.errors)
    await pool.publish(subjects.cpu_prefill_heartbeat("w1"), b"its own heartbeat")
    await pool.flush()
    await asyncio.sleep(0.2)
    assert len(violations.errors) == before


async def test_only_workers_publish_states_and_only_the_scheduler_submits(secured, stack):
    operator = await Bus.open(secured.url, "operator", stack, credentials=secured.creds("operator"))
    states = await operator.nc.subscribe(subjects.STATE_ALL)
    submits = await operator.nc.subscribe(subjects.any_worker("submit"))
    await operator.nc.flush()
    gateway, violations = await raw_client(stack, secured, "gateway")
    await gateway.publish(subjects.worker_submit("w1"), b"bypass the scheduler")
    await violations.wait_for("permissions violation for publish")
    w1, worker_violations = await raw_client(stack, secured, "w1")
    await w1.publish(subjects.state("w2"), b"a fake worker")  # w1 may speak only for itself
    await worker_violations.wait_for("permissions violation for publish")
    await w1.publish(subjects.state("w1"), b"its own state")
    assert (await states.next_msg(timeout=2)).subject == subjects.state("w1")
    with pytest.raises(nats.errors.TimeoutError):
        await submits.next_msg(timeout=0.3)


async def test_a_client_generates_through_services_that_log_in(secured, stack, tiny_model_dir, adapter_dir):
    gateway, worker = await services(stack, secured, tiny_model_dir, adapter_dir)
    alice = await Bus.open(secured.url, "alice", stack, credentials=secured.creds("alice"))
    inbox, sub = await open_stream(alice, GenerateRequest(model="sql", prompt="hello", max_tokens=4,
                                                          request_id="alice-1"))
    assert inbox.startswith("_INBOX.client.alice.")
    chunks = await rest_of(sub, Chunk.decode((await sub.next_msg(timeout=10)).data))
    assert chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == 4
    assert chunks[0].cancel_token and all(c.cancel_token is None for c in chunks[1:])
    assert worker.submits[0].reply_inbox.startswith("_INBOX.gw.gateway.")


async def test_a_client_lists_adapters_and_a_worker_answers_through_allow_responses(secured, stack):
    worker = await Bus.open(secured.url, "w1", stack, grace_s=0.1, credentials=secured.creds("w1"))

    async def on_list(request: AdapterListRequest, msg) -> AdapterList:
        return AdapterList(worker_id="w1", adapters=WORKER_ADAPTERS)
    await worker.serve(subjects.ADAPTERS_LIST, AdapterListRequest, on_list)
    alice = await Bus.open(secured.url, "alice", stack, grace_s=0.1, credentials=secured.creds("alice"))
    reply = await alice.request(subjects.ADAPTERS_LIST, AdapterListRequest(), AdapterList, timeout=3)
    assert reply.adapters == WORKER_ADAPTERS


async def test_a_generate_naming_an_internal_inbox_is_dropped(secured, stack, tiny_model_dir, adapter_dir):
    gateway, worker = await services(stack, secured, tiny_model_dir, adapter_dir)
    operator = await Bus.open(secured.url, "operator", stack, credentials=secured.creds("operator"))
    spied = await operator.nc.subscribe("_INBOX.gw.>")
    await operator.nc.flush()
    alice, _ = await raw_client(stack, secured, "alice")
    await alice.publish(subjects.GENERATE, GenerateRequest(model="sql", prompt="x", max_tokens=2).encode(),
                        reply="_INBOX.gw.gateway.someone.0")
    await alice.flush()
    with pytest.raises(nats.errors.TimeoutError):
        await spied.next_msg(timeout=0.5)
    assert not worker.submits


async def test_only_the_requesters_token_cancels(secured, stack, tiny_model_dir, adapter_dir):
    gateway, worker = await services(stack, secured, tiny_model_dir, adapter_dir)
    alice = await Bus.open(secured.url, "alice", stack, credentials=secured.creds("alice"))
    bob = await Bus.open(secured.url, "bob", stack, credentials=secured.creds("bob"))
    _, sub = await open_stream(alice, GenerateRequest(model="sql", prompt="a long story", max_tokens=200,
                                                      request_id="alice-long"))
    first = Chunk.decode((await sub.next_msg(timeout=10)).data)
    assert first.cancel_token and not first.final
    for attempt in (CancelRequest(request_id="alice-long"),
                    CancelRequest(request_id="alice-long", cancel_token="x" * len(first.cancel_token)),
                    CancelRequest(request_id="alice-long", api_key="anything")):
        await bob.publish(subjects.CANCEL, attempt)
    await bob.nc.flush()
    await asyncio.sleep(0.3)
    assert "alice-long" in worker.running_ids and not worker.cancels
    await alice.publish(subjects.CANCEL, CancelRequest(request_id="alice-long", cancel_token=first.cancel_token))
    chunks = await rest_of(sub, first)
    assert chunks[-1].finish_reason == "cancelled"
    await wait_until(lambda: worker.cancels == ["alice-long"])


async def test_with_api_keys_the_requesters_tenant_cancels(secured, stack, tiny_model_dir, adapter_dir):
    gateway, worker = await services(stack, secured, tiny_model_dir, adapter_dir,
                                     api_keys=("key-a:alice", "key-b:bob"), tenant_adapters=("alice:*", "bob:*"))
    alice = await Bus.open(secured.url, "alice", stack, credentials=secured.creds("alice"))
    bob = await Bus.open(secured.url, "bob", stack, credentials=secured.creds("bob"))
    _, sub = await open_stream(alice, GenerateRequest(model="sql", prompt="a long story", max_tokens=200,
                                                      request_id="tenant-long", api_key="key-a"))
    first = Chunk.decode((await sub.next_msg(timeout=10)).data)
    await bob.publish(subjects.CANCEL, CancelRequest(request_id="tenant-long", api_key="key-b"))
    await bob.nc.flush()
    await asyncio.sleep(0.3)
    assert "tenant-long" in worker.running_ids and not worker.cancels
    await alice.publish(subjects.CANCEL, CancelRequest(request_id="tenant-long", api_key="key-a"))
    chunks = await rest_of(sub, first)
    assert chunks[-1].finish_reason == "cancelled"


async def test_states_from_the_fleet_reach_the_gateway_only_from_real_workers(secured, stack, tiny_model_dir,
                                                                             adapter_dir):
    gateway, _ = await services(stack, secured, tiny_model_dir, adapter_dir)
    alice, violations = await raw_client(stack, secured, "alice")
    fake = WorkerState(worker_id="ghost", model=gateway.model_name, backend="bgmv", running=[], adapters=[],
                       free_kv_blocks=1, total_kv_blocks=1, block_size=16, max_batch_size=1, max_model_len=64,
                       seq=1, timestamp=0.0)
    await alice.publish(subjects.state("ghost"), fake.encode())
    await violations.wait_for("permissions violation for publish")
    assert gateway.fleet.live_workers() == ["w1"]


def test_credential_files_are_private(secured):
    for path in secured.files.values():
        assert path.stat().st_mode & 0o777 == 0o600
    alice = secured.creds("alice")
    assert alice.password not in repr(alice) and alice.password not in repr(new_user("client", "x"))
