"""The gateway service: the public edge of CaraServe (NATS API and OpenAI-compatible HTTP).

:meth:`GatewayService.start` connects to NATS, ends the requests a previous process of this
gateway left in flight (:mod:`services.gateway.stream_journal`), loads the tokenizer,
follows the workers' states (``state.*``: liveness, capacity and adapters, see
:mod:`services.gateway.fleet_view`), serves ``generate`` (queue group) and
``cancel`` (every replica), and starts the HTTP server. Everything it starts is undone by the
AsyncExitStack in reverse order: HTTP first (in-flight requests get ``grace_s``), then the
NATS subscriptions and the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from services.gateway.adapter_admin import AdapterAdmin
from services.gateway.config import GatewayConfig
from services.gateway.fleet_view import FleetView
from services.gateway.http_api import HttpApi
from services.gateway.inbox import ChunkInbox
from services.gateway.nats_api import NatsApi, error_chunk
from services.gateway.prepare import RequestPreparer
from services.gateway.relay import Relay
from services.gateway.request_stream import StreamDeps
from services.gateway.stream_journal import IN_MEMORY, Orphan, StreamJournal
from services.gateway.tenancy import Tenancy
from shared import subjects
from shared.background import run_in_background
from shared.bus import Bus
from shared.config import from_env
from shared.nats_auth import load_credentials
from shared.schemas import CancelRequest, Chunk, GenerateRequest, WorkerState, error_info
from shared.served_name import served_model_name
from shared.prometheus_endpoint import PrometheusExport, serve_metrics
from shared.telemetry import Telemetry, setup_telemetry

logger = logging.getLogger(__name__)

SERVICE_NAME = "caraserve-gateway"


def context_length(model_dir: Path, configured: int) -> int:
    """``configured`` when set, else the model's ``max_position_embeddings``."""
    if configured:
        return configured
    config = json.loads((model_dir / "config.json").read_text())
    length = config.get("max_position_embeddings")
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"{model_dir}/config.json has no usable max_position_embeddings; set max_model_len")
    return length


def journal_path(config: GatewayConfig) -> str:
    """This replica's stream journal: ``<journal_dir>/<host>-<name>.journal`` (a container keeps
    its host name across restarts), or in memory without ``journal_dir``."""
    if not config.journal_dir:
        return IN_MEMORY
    directory = Path(config.journal_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return str(directory / f"{socket.gethostname()}-{config.name}.journal")


class GatewayService:
    """One gateway replica."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.bus: Bus | None = None
        self.telemetry: Telemetry | None = None
        self.metrics_port = 0  # the bound /metrics port (0: off)
        self.fleet: FleetView | None = None  # made once the base model's name is known
        self.relay: Relay | None = None
        self.http_port: int | None = None
        self.model_name = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> GatewayService:
        """A gateway configured from CARASERVE_* variables (docker-compose, ``caraserve service``)."""
        return cls(from_env(GatewayConfig, environ))

    @staticmethod
    def config_classes() -> tuple[type, ...]:
        """The config dataclasses :meth:`from_environ` reads."""
        return (GatewayConfig,)

    @property
    def healthy(self) -> bool:
        return self.bus is not None and self.bus.connected

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        config = self.config
        export = PrometheusExport() if config.metrics_port else None
        self.telemetry = setup_telemetry(SERVICE_NAME, prometheus=export)
        stack.callback(self.telemetry.shutdown)
        if export is not None:
            self.metrics_port = await serve_metrics(export, config.metrics_host, config.metrics_port, stack)
        self.bus = bus = await Bus.open(config.nats_url, config.name, stack, config.grace_s,
                                          load_credentials(config.nats_creds))
        journal = StreamJournal(journal_path(config))
        stack.callback(journal.close)
        await self._end_orphans(bus, journal.take_orphans())  # first: a restart's clients wait for it
        tokenizer, max_model_len = await self._load_model()
        self.fleet = fleet = FleetView(self.model_name, config.worker_timeout_s, config.missing_grace_s)
        tenancy = Tenancy(config.api_keys, config.tenant_adapters, config.admin_tenants)
        preparer = RequestPreparer(tokenizer, fleet, tenancy, max_model_len, config.default_max_tokens)
        await bus.listen(subjects.STATE_ALL, WorkerState, fleet.on_state)
        run_in_background(stack, fleet.run(lambda: bus.connected), "fleet view sweep")
        inbox = ChunkInbox(bus)
        await inbox.start()
        deps = StreamDeps(config, bus, inbox, fleet, journal, self.telemetry.tracer, self.model_name)
        self.relay = Relay(deps, self.telemetry.metrics)
        api = NatsApi(bus, preparer, self.relay)
        await bus.listen(subjects.CANCEL, CancelRequest, api.cancel)
        await bus.serve(subjects.GENERATE, GenerateRequest, api.generate, queue=config.queue_group,
                        error_reply=error_chunk)
        if config.http_port >= 0:
            admin = AdapterAdmin(bus, fleet, tenancy, config.adapter_dir)
            await self._start_http(stack, HttpApi(preparer, self.relay, self.health), admin)
        logger.info("gateway %s serving %s (model %s) and HTTP on %s:%s", config.name, subjects.GENERATE,
                    self.model_name, config.http_host, self.http_port)

    async def _load_model(self) -> tuple[Any, int]:
        """The base model's tokenizer and context length; sets :attr:`model_name`."""
        from shared.model_store import resolve_model_dir
        from shared.tokenizer import load_tokenizer

        config = self.config
        model_dir = await asyncio.to_thread(resolve_model_dir, config.model_dir)
        tokenizer = await asyncio.to_thread(load_tokenizer, model_dir)
        self.model_name = served_model_name(model_dir, config.model_name)
        return tokenizer, context_length(model_dir, config.max_model_len)

    async def _end_orphans(self, bus: Bus, orphans: list[Orphan]) -> None:
        """End the requests a previous process of this gateway left in flight: each NATS client
        gets its final chunk, each worker is told to cancel."""
        for orphan in orphans:
            if orphan.reply_to is not None:
                await bus.publish(orphan.reply_to, Chunk(
                    request_id=orphan.request_id, index=orphan.next_index, finish_reason="error",
                    error=error_info("gateway_restarted", "the gateway serving this request restarted")))
            if orphan.worker_id is not None:
                await bus.publish(subjects.worker_cancel(orphan.worker_id), CancelRequest(request_id=orphan.request_id))
        if orphans:
            logger.warning("ended %d requests the previous gateway process left in flight", len(orphans))

    async def _start_http(self, stack: contextlib.AsyncExitStack, api: HttpApi, admin: AdapterAdmin) -> None:
        app = api.app()
        admin.add_routes(app)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=self.config.grace_s,
                               access_log=None)
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, self.config.http_host, self.config.http_port)
        await site.start()
        self.http_port = runner.addresses[0][1]

    def health(self) -> dict[str, Any]:
        """What ``GET /health`` reports, with its ``status``:

        * ``ok`` (HTTP 200): connected to NATS, at least one worker live, and every worker this
          gateway ever heard from is live;
        * ``degraded`` (HTTP 200): connected, but capacity is lost: a worker heard from before is
          silent now (listed in ``lost_workers``; it is ok again once it heartbeats, e.g. after its
          restart), or no worker is live at all (``capacity`` 0: requests get 503 no_capacity);
        * ``unavailable`` (HTTP 503): not connected to NATS.

        ``capacity`` is how many requests may be in flight now: ``min(max_inflight, sum over
        live workers of max_batch_size + max_queued)``; past it requests get 429. ``worker_info``
        gives each live worker's kernel family, profile status (``pending`` while it makes its
        profile, then the profile's digest) and CPU prefill pool (``off``, ``healthy``,
        ``unhealthy``).
        """
        fleet = self.fleet
        assert fleet is not None, "health is served only once the gateway started"
        connected = self.bus is not None and self.bus.connected
        live = fleet.live_workers()
        lost = sorted(set(fleet.known_workers()) - set(live))
        status = "unavailable" if not connected else "degraded" if lost or not live else "ok"
        relay = self.relay
        return {"status": status, "nats": connected, "model": self.model_name, "workers": live,
                "lost_workers": lost, "capacity": min(self.config.max_inflight, fleet.capacity()),
                "inflight": relay.limiter.count if relay else 0, "max_inflight": self.config.max_inflight,
                "worker_info": fleet.worker_info()}
