"""The cpu_prefill service against a test-local stand-in for its worker's side of ``cpu_prefill.<id>.*``.

The stand-in is a real NATS responder logged in as the worker's role and owning real rings; the
service logs in as the pool's role on a nats-server that enforces both roles. Checked: the hello
is retried past an error that is not a refusal, the pool attaches with every process alive and
heartbeats say so, the pool follows the worker to a new ring, stops (without restart loops) when
the ring's owner is killed, a refusal is one clear line and exit status 2, and closing leaves no
process and no segment.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from services.cpu_prefill.config import PoolConfig
from services.cpu_prefill.service import EXIT_REFUSED, CpuPrefillService
from shared import subjects
from shared.bus import Bus
from shared.llama_shape import LlamaShape
from shared.nats_auth import new_user, read_credentials, write_credentials
from shared.nats_server import NatsServer
from shared.schemas import ServiceError
from shared.schemas.cpu_prefill import PoolHeartbeat, PoolHello, PoolWelcome
from shared.shm_exchange import ExchangeRing, RingGeometry, remove_stale_segments, segment_prefix
from tests.service.helpers import wait_until

pytestmark = pytest.mark.timeout(120)

SHAPE = LlamaShape(num_layers=2, hidden_size=16, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4)
WORKERS = 2


class WorkerSide:
    """Answers the pool's hello and heartbeats as a gpu_worker would, over a ring it owns."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.ring = ExchangeRing.create(segment_prefix(worker_id), RingGeometry(SHAPE, "float32", 4, 1, WORKERS))
        self.ring_name = self.ring.name  # the ring the answers name (another process's in one test)
        self.errors: list[ServiceError] = []  # answered to the next hellos, in order
        self.hellos: list[PoolHello] = []
        self.beats: list[PoolHeartbeat] = []

    async def serve(self, bus: Bus) -> None:
        await bus.serve(subjects.cpu_prefill_hello(self.worker_id), PoolHello, self.hello)
        await bus.serve(subjects.cpu_prefill_heartbeat(self.worker_id), PoolHeartbeat, self.heartbeat)

    def welcome(self) -> PoolWelcome:
        return PoolWelcome(worker_id=self.worker_id, ring=self.ring_name, workers=WORKERS, heartbeat_s=5.0)

    async def hello(self, hello: PoolHello, _msg) -> PoolWelcome:
        self.hellos.append(hello)
        if self.errors:
            raise self.errors.pop(0)
        return self.welcome()

    async def heartbeat(self, beat: PoolHeartbeat, _msg) -> PoolWelcome:
        self.beats.append(beat)
        return self.welcome()

    def restart(self) -> None:
        """A new ring under a new name, as a restarted worker process would have; the old one is unlinked."""
        old = self.ring
        self.ring = ExchangeRing.create(segment_prefix(self.worker_id, pid=1), old.geometry)
        self.ring_name = self.ring.name
        old.close()

    def close(self) -> None:
        self.ring.close()

    def beat_on(self, ring: str) -> bool:
        return any(b.ring == ring and b.alive == WORKERS for b in self.beats)


@pytest.fixture
def worker_id() -> str:
    return f"w{uuid.uuid4().hex[:8]}"


@pytest.fixture
def secured(tmp_path, worker_id):
    """A nats-server that lets the pool and its worker in only under their own roles."""
    users = {"pool": new_user("cpu_prefill", worker_id), "worker": new_user("gpu_worker", worker_id)}
    files = {key: write_credentials(user.credentials, tmp_path / "creds" / f"{key}.json")
             for key, user in users.items()}
    with NatsServer(users=list(users.values())) as server:
        yield server, files


@pytest.fixture
def model_dir(tmp_path) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "num_hidden_layers": SHAPE.num_layers, "hidden_size": SHAPE.hidden_size,
        "intermediate_size": SHAPE.intermediate_size, "num_attention_heads": SHAPE.num_heads,
        "num_key_value_heads": SHAPE.num_kv_heads, "head_dim": SHAPE.head_dim}))
    return path


def shm_names(worker_id: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"caraserve-{worker_id}-")]


async def start_worker_side(stack, secured, worker_id: str) -> WorkerSide:
    server, files = secured
    side = WorkerSide(worker_id)
    stack.callback(side.close)  # after the service (the stack unwinds in reverse)
    await side.serve(await Bus.open(server.url, "worker-side", stack, credentials=read_credentials(files["worker"])))
    return side


def pool_service(secured, worker_id: str, model_dir: Path) -> CpuPrefillService:
    server, files = secured
    return CpuPrefillService(PoolConfig(worker_id=worker_id, nats_url=server.url, nats_creds=str(files["pool"]),
                                        model=str(model_dir), heartbeat_s=0.1))


async def test_the_pool_attaches_beats_and_follows_a_restarted_worker(stack, secured, worker_id, model_dir):
    side = await start_worker_side(stack, secured, worker_id)
    side.errors.append(ServiceError("overloaded", "busy starting"))  # not a refusal: the hello is retried
    service = pool_service(secured, worker_id, model_dir)
    await service.start(stack)
    assert not side.errors and len(side.hellos) >= 2  # (more if a reply was late on a loaded machine)
    hello = side.hellos[-1]
    assert (hello.num_layers, hello.hidden_size, hello.head_dim, hello.workers) == (2, 16, 4, 0)
    first = side.ring.name
    await wait_until(lambda: side.beat_on(first), timeout_s=60)
    assert service.healthy and service.heartbeat_s == 0.1  # its own, shorter than the worker's 5 s
    side.restart()
    await wait_until(lambda: side.beat_on(side.ring.name), timeout_s=60)
    assert service.pool.ring_name == side.ring.name and service.pool.alive() == WORKERS
    pids = service.pool.pids()
    await stack.aclose()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not shm_names(worker_id)


async def test_a_refused_hello_is_one_line_and_exit_status_2(stack, secured, worker_id, model_dir, caplog):
    side = await start_worker_side(stack, secured, worker_id)
    side.errors.extend([ServiceError("invalid_request", "model geometry differs")] * 5)  # even if a reply is late
    service = pool_service(secured, worker_id, model_dir)
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exited:
        await service.start(stack)
    assert exited.value.code == EXIT_REFUSED
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert lines == [f"cpu_prefill: refused by worker {worker_id}: model geometry differs"]
    assert service.pool is None and side.hellos
    await stack.aclose()


OWNER = """
import sys, time
from shared.llama_shape import LlamaShape
from shared.shm_exchange import ExchangeRing, RingGeometry, segment_prefix
shape = LlamaShape(num_layers=2, hidden_size=16, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=4)
ring = ExchangeRing.create(segment_prefix(sys.argv[1]), RingGeometry(shape, "float32", 4, 1, 2))
print(ring.name, flush=True)
time.sleep(120)
"""


async def test_a_killed_worker_stops_the_pool_until_its_successor_answers(stack, secured, worker_id, model_dir):
    root = Path(__file__).resolve().parents[2]
    owner = subprocess.Popen([sys.executable, "-c", OWNER, worker_id], stdout=subprocess.PIPE, text=True, cwd=root)
    stack.callback(owner.wait)
    stack.callback(owner.kill)
    side = await start_worker_side(stack, secured, worker_id)
    side.ring_name = owner.stdout.readline().strip()  # the worker process that will be killed owns this ring
    service = pool_service(secured, worker_id, model_dir)
    await service.start(stack)
    await wait_until(lambda: side.beat_on(side.ring_name), timeout_s=60)
    pids = service.pool.pids()
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    await wait_until(lambda: not service.pool.started, timeout_s=10)
    beats = len(side.beats)
    await wait_until(lambda: len(side.beats) >= beats + 3, timeout_s=10)  # the ring is still named...
    assert not service.pool.started and not service.pool.pids()  # ...but no process is restarted on it
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    side.ring_name = side.ring.name  # the successor's ring
    await wait_until(lambda: side.beat_on(side.ring.name), timeout_s=60)
    await stack.aclose()
    assert remove_stale_segments(worker_id)  # only the killed owner's ring was left behind
    assert not shm_names(worker_id)
