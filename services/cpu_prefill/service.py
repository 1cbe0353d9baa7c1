"""The cpu_prefill service: the pool of CPU processes of one gpu_worker, reporting over NATS.

It introduces itself to its worker with a ``PoolHello`` on ``cpu_prefill.<id>.hello`` (retrying
until the worker answers, backing off from RETRY_S to MAX_RETRY_S), starts a :class:`CpuPool` on
the ring the worker names, and then every heartbeat interval (the shorter of its own
``heartbeat_s`` and the worker's): restarts any dead CPU process and sends a ``PoolHeartbeat``
(how many processes are alive). When the answer names another ring (the worker restarted), the
pool moves to it. A worker that refuses the hello with ``invalid_request`` (another model,
another exchange version, another pool size) is logged as one line and the service exits with
status 2; any other error answer is retried like silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping

import nats.errors

from services.cpu_prefill.config import PoolConfig
from services.cpu_prefill.pool import CpuPool
from shared import subjects
from shared.background import run_in_background
from shared.bus import Bus
from shared.config import from_env
from shared.llama_shape import LlamaShape
from shared.nats_auth import load_credentials
from shared.schemas import RemoteError, SchemaError
from shared.schemas.cpu_prefill import PoolHeartbeat, PoolHello, PoolWelcome
from shared.shm_exchange import VERSION, RingMismatchError

log = logging.getLogger(__name__)

EXIT_REFUSED = 2
REQUEST_TIMEOUT_S = 2.0
RETRY_S = 0.5
MAX_RETRY_S = 5.0


class PoolRefusedError(RuntimeError):
    """The worker refused this pool at hello."""


class CpuPrefillService:
    """One pool: :meth:`start` wires it onto an AsyncExitStack."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.bus: Bus | None = None
        self.pool: CpuPool | None = None
        self.welcome: PoolWelcome | None = None
        self.heartbeat_s = config.heartbeat_s
        self.beats = 0  # heartbeats the worker answered

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> "CpuPrefillService":
        return cls(from_env(PoolConfig, environ))

    @staticmethod
    def config_classes() -> tuple[type, ...]:
        return (PoolConfig,)

    @property
    def healthy(self) -> bool:
        return (self.bus is not None and self.bus.connected and self.pool is not None
                and self.pool.alive() == self.pool.workers)

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        wid = self.config.worker_id
        shape = self._shape()
        self.bus = await Bus.open(self.config.nats_url, f"cpu-prefill-{wid}", stack, 1.0,
                                  load_credentials(self.config.nats_creds))
        welcome = await self._hello(shape)
        stack.callback(self._close_pool)  # before the start: a pool that fails half-way is closed too
        self._start_pool(welcome)
        run_in_background(stack, self._heartbeats(), "pool heartbeats")

    def _shape(self) -> LlamaShape:
        """The geometry of the configured model (its config.json only; the weights stay with the worker).
        A model it cannot read is one error line and exit status 2, like a refusal."""
        from shared.model_store import resolve_model_dir

        try:
            model_dir = self.config.model if self.config.model != "default" else resolve_model_dir(None)
            return LlamaShape.from_model_dir(model_dir)
        except (OSError, ValueError, KeyError) as exc:
            log.error("cpu_prefill: cannot read the geometry of model %s: %s", self.config.model, exc)
            raise SystemExit(EXIT_REFUSED) from None

    async def _hello(self, shape: LlamaShape) -> PoolWelcome:
        """Introduce the pool until the worker answers; exits the process if it refuses."""
        assert self.bus is not None
        hello = PoolHello(worker_id=self.config.worker_id, pid=os.getpid(), exchange_version=VERSION,
                          num_layers=shape.num_layers, hidden_size=shape.hidden_size,
                          intermediate_size=shape.intermediate_size, num_heads=shape.num_heads,
                          num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                          workers=self.config.cpu_prefill_workers)
        deadline, retry_s = time.monotonic() + self.config.hello_timeout_s, RETRY_S
        while True:
            try:
                return await self.bus.request(subjects.cpu_prefill_hello(self.config.worker_id), hello, PoolWelcome,
                                              REQUEST_TIMEOUT_S)
            except RemoteError as exc:
                if exc.info.code == "invalid_request":
                    log.error("cpu_prefill: refused by worker %s: %s", self.config.worker_id, exc.info.message)
                    raise SystemExit(EXIT_REFUSED) from None
                log.warning("cpu_prefill: worker %s answered the hello with %s; retrying", self.config.worker_id, exc)
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError, asyncio.TimeoutError, SchemaError):
                pass
            if time.monotonic() > deadline:
                raise ConnectionError(f"worker {self.config.worker_id} did not answer the cpu_prefill hello "
                                      f"within {self.config.hello_timeout_s:.0f} s")
            await asyncio.sleep(retry_s)
            retry_s = min(2 * retry_s, MAX_RETRY_S)

    def _start_pool(self, welcome: PoolWelcome) -> None:
        self.welcome, self.heartbeat_s = welcome, min(self.config.heartbeat_s, welcome.heartbeat_s)
        self.pool = CpuPool(welcome.ring, welcome.workers)
        try:
            self.pool.start()
        except (FileNotFoundError, RingMismatchError) as exc:
            log.warning("cpu_prefill: cannot attach ring %s yet: %s", welcome.ring, exc)

    def _close_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()

    async def _heartbeats(self) -> None:
        """Restart dead processes, report, and follow the worker to a new ring when it restarts."""
        assert self.bus is not None and self.pool is not None
        while True:
            await asyncio.sleep(self.heartbeat_s)
            if self.pool.started and not self.pool.owner_alive():
                log.warning("cpu_prefill: the worker process owning %s is gone; waiting for its successor's ring",
                            self.pool.ring_name)
                self.pool.close()
                self.welcome = None  # only an answer naming another ring (its successor's) restarts the pool
            if not self.pool.started and self.welcome is not None:
                self._start_pool(self.welcome)
            self.pool.restart_dead()
            beat = PoolHeartbeat(worker_id=self.config.worker_id, pid=os.getpid(), ring=self.pool.ring_name,
                                 workers=self.pool.workers, alive=self.pool.alive())
            try:
                welcome = await self.bus.request(subjects.cpu_prefill_heartbeat(self.config.worker_id), beat,
                                                 PoolWelcome, REQUEST_TIMEOUT_S)
            except (RemoteError, SchemaError, nats.errors.Error, asyncio.TimeoutError) as exc:
                log.debug("cpu_prefill heartbeat unanswered: %s", exc)
                continue
            self.beats += 1
            if welcome.ring != self.pool.ring_name or welcome.workers != self.pool.workers:
                log.info("cpu_prefill: worker %s moved to ring %s", self.config.worker_id, welcome.ring)
                self.pool.close()
                self._start_pool(welcome)
