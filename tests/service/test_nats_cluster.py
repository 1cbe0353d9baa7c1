"""Beyond one NATS server (issue 13 §5): three clustered nats-servers, one killed with streams in flight.

The nodes run on loopback ports with the same users (every service logs in). The gateway, the
scheduler, two workers and the client each prefer a different node and know the full list.
Killing a node must leave every accepted request with a final chunk, and serving must resume
within 10 s on the surviving nodes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from shared import subjects
from shared.bus import Bus
from shared.nats_auth import NatsUser, new_user, write_credentials
from shared.nats_server import NatsServer, NatsServerConfig
from shared.schemas import AdapterInfo, Chunk, GenerateRequest
from tests.service.helpers import make_adapter_dir, start_gateway, start_scheduler, start_worker, wait_until

pytestmark = pytest.mark.timeout(60)

CLUSTER = "caraserve-test"
IDENTITIES = {"gateway": ("gateway", "gateway"), "scheduler-0": ("scheduler", "scheduler-0"),
              "w1": ("gpu_worker", "w1"), "w2": ("gpu_worker", "w2"), "alice": ("client", "alice")}
WORKER_ADAPTERS = [AdapterInfo(name="sql", rank=8, level="host")]
STREAMS = 8
RESUME_WITHIN_S = 10.0


def start_cluster(users: list[NatsUser]) -> list[NatsServer]:
    """Three nodes: the first alone, each later one routed to those before it (a full mesh)."""
    nodes: list[NatsServer] = []
    for _ in range(3):
        routes = tuple(node.route_url for node in nodes)
        node = NatsServer(NatsServerConfig(cluster_name=CLUSTER, routes=routes), users=users)
        nodes.append(node)
        node.start()
    return nodes


@pytest.fixture
def cluster(tmp_path) -> Iterator[tuple[list[NatsServer], dict[str, NatsUser]]]:
    users = {key: new_user(role, name) for key, (role, name) in IDENTITIES.items()}
    nodes = start_cluster(list(users.values()))
    try:
        yield nodes, users
    finally:
        for node in nodes:
            node.stop()


def preferring(nodes: list[NatsServer], first: int) -> str:
    """The full server list, node ``first`` first (the node a service prefers)."""
    urls = [node.url for node in nodes]
    return ",".join(urls[first:] + urls[:first])


async def wait_for_mesh(nodes: list[NatsServer], users: dict[str, NatsUser], stack) -> None:
    """Until a message published on each node reaches a subscriber on every other (routes are up)."""
    for i, node in enumerate(nodes):
        listener = await Bus.open(node.url, f"mesh-{i}", stack, grace_s=0.1, credentials=users["w1"].credentials)
        sub = await listener.nc.subscribe(subjects.worker_submit("w1"))
        await listener.nc.flush()
        for j, other in enumerate(nodes):
            if j == i:
                continue
            sender = await Bus.open(other.url, f"mesh-{j}-to-{i}", stack, grace_s=0.1,
                                    credentials=users["scheduler-0"].credentials)
            deadline = time.monotonic() + 5
            while True:
                await sender.nc.publish(subjects.worker_submit("w1"), b"probe")
                try:
                    await sub.next_msg(timeout=0.1)
                    break
                except asyncio.TimeoutError:
                    assert time.monotonic() < deadline, f"node {j} does not route to node {i}"
        await sub.unsubscribe()


async def generate(bus: Bus, request: GenerateRequest):
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    await bus.nc.publish(subjects.GENERATE, request.encode(), reply=inbox)
    return sub


async def collect(sub, first: Chunk, timeout_s: float) -> list[Chunk]:
    chunks = [first]
    deadline = time.monotonic() + timeout_s
    while not chunks[-1].final:
        chunks.append(Chunk.decode((await sub.next_msg(timeout=max(0.01, deadline - time.monotonic()))).data))
    return chunks


async def test_killing_a_node_with_streams_in_flight(cluster, stack, tiny_model_dir, tmp_path):
    nodes, users = cluster
    files = {key: write_credentials(user.credentials, tmp_path / f"{key}.json") for key, user in users.items()}
    await wait_for_mesh(nodes, users, stack)
    adapter_dir = make_adapter_dir(tmp_path / "adapters", {"sql": 8})
    await start_scheduler(stack, preferring(nodes, 2), name="scheduler-0", nats_creds=str(files["scheduler-0"]))
    gateway = await start_gateway(stack, preferring(nodes, 1), tiny_model_dir, adapter_dir=str(adapter_dir),
                                  nats_creds=str(files["gateway"]))
    workers = [await start_worker(stack, preferring(nodes, index), wid, model=gateway.model_name,
                                  adapters=WORKER_ADAPTERS, credentials=users[wid].credentials, step_s=0.03)
               for index, wid in ((0, "w1"), (1, "w2"))]
    await wait_until(lambda: gateway.fleet.live_workers() == ["w1", "w2"], timeout_s=10)
    alice = await Bus.open(preferring(nodes, 0), "alice", stack, grace_s=0.1, credentials=users["alice"].credentials)
    assert gateway.bus.nc.connected_url.port == nodes[1].port  # the node that will die

    subs = [await generate(alice, GenerateRequest(model="sql", prompt=f"story {i}", max_tokens=100,
                                                  request_id=f"flight-{i}")) for i in range(STREAMS)]
    firsts = [Chunk.decode((await sub.next_msg(timeout=10)).data) for sub in subs]  # all accepted
    assert all(not first.final for first in firsts) and {w.worker_id for w in workers if w.running_ids} == {"w1", "w2"}

    nodes[1].kill()  # the gateway's and w2's node
    killed_at = time.monotonic()
    streams = await asyncio.gather(*(collect(sub, first, 25) for sub, first in zip(subs, firsts)))
    for chunks in streams:  # every accepted request ends with exactly one final chunk
        assert [c.final for c in chunks].count(True) == 1
        # the gateway's own node died: its streams may have lost chunks, so they end stream_interrupted
        assert chunks[-1].finish_reason == "length" or chunks[-1].error.code in ("worker_lost", "stream_interrupted")

    resumed_at = None
    while resumed_at is None:
        assert time.monotonic() - killed_at < RESUME_WITHIN_S, "serving did not resume in time"
        sub = await generate(alice, GenerateRequest(model="sql", prompt="after", max_tokens=3))
        try:
            chunks = await collect(sub, Chunk.decode((await sub.next_msg(timeout=2)).data), 2)
        except asyncio.TimeoutError:
            continue
        if chunks[-1].finish_reason == "length":
            resumed_at = time.monotonic()
    assert gateway.bus.connected and gateway.bus.nc.connected_url.port != nodes[1].port
    assert sorted(gateway.fleet.live_workers()) == ["w1", "w2"]  # w2 reconnected to another node
