"""vLLM-compatible runtime adapter registration on the gateway's HTTP API.

* ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path", "pinned"?}``;
* ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``.

The gateway checks the request (the caller's API key; a bounded JSON body; the name; a path
of at most 4096 characters without NUL or control characters that, when it knows the adapter
root, stays inside it; and who owns the name and the folder, see ``adapter_owners.py``), then
publishes AdapterLoad / AdapterUnload on ``caraserve.v1.adapters.load`` / ``.unload`` and
collects every live worker's answer. Success (200, a plain-text message as vLLM answers) when
at least one worker took the change; else the workers' error: a path outside the root, a name
registered with another path, or an unusable adapter (the worker checks its config, shapes
and weights when it registers it) are 400; unloading an unknown adapter is 404; no worker
answering is 503. The gateway's own refusals are 400 (malformed), 401 (key), 403 (another
tenant's adapter or folder) and 404. A loaded adapter joins the catalog at once, from the
workers' answers (the loading tenant may use it); an unloaded one leaves it. The workers'
next states say the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from aiohttp import web
from nats.errors import Error as NatsError

from services.gateway.adapter_owners import AdapterOwners
from services.gateway.fleet_view import FleetView
from services.gateway.http_api import bearer_key, error_response
from services.gateway.tenancy import Tenancy
from shared import subjects
from shared.adapter_registry import AdapterRegistry, RegistryError, check_name, check_path_text
from shared.bounded_json import BoundedJsonError, loads_bounded
from shared.bus import Bus
from shared.schemas import (AdapterList, AdapterLoad, AdapterUnload, ErrorInfo, Message, RemoteError, SchemaError,
                            ServiceError, decode_reply, error_info)

logger = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 5.0
MAX_BODY_BYTES = 64 * 1024  # a registration body is a name, a path and a flag


class AdapterAdmin:
    """Handlers for the two registration routes, fanning out to the workers over NATS."""

    def __init__(self, bus: Bus, fleet: FleetView, tenancy: Tenancy, adapter_dir: str = "",
                 timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self.bus, self.fleet, self.tenancy = bus, fleet, tenancy
        self.registry = AdapterRegistry(adapter_dir) if adapter_dir else None
        self.owners = AdapterOwners(tenancy, fleet, self.registry.root if self.registry else None)
        self.timeout_s = timeout_s

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)

    async def load(self, request: web.Request) -> web.Response:
        try:
            tenant = self.tenancy.authenticate(bearer_key(request))
            body = await self._body(request)
            name, path, pinned = self._name(body), self._path(body), body.get("pinned", False)
            if not isinstance(pinned, bool):
                raise _Invalid("pinned must be true or false")
            folder = self.registry.safe_path(path) if self.registry is not None else None
            new = self.owners.claim(tenant, name, folder)
        except (_Invalid, RegistryError) as exc:
            return error_response(error_info("invalid_request", str(exc)))
        except ServiceError as exc:
            return error_response(exc.info)
        message = AdapterLoad(name=name, path=path, pinned=pinned, owner=tenant)
        lists, errors = await self.fan_out(subjects.ADAPTERS_LOAD, message)
        if not lists:
            if new:
                self.owners.release(name)
            return error_response(errors[0] if errors else error_info("no_capacity", "no worker answered"))
        for listing in lists:
            self.fleet.observe_adapters(listing.worker_id, listing.adapters)
        self.tenancy.grant(tenant, name)
        logger.info("adapter %s loaded from %s by tenant %s on %s", name, path, tenant,
                    ", ".join(sorted(l.worker_id for l in lists)))
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        try:
            tenant = self.tenancy.authenticate(bearer_key(request))
            name = self._name(await self._body(request))
            self.owners.check_unload(tenant, name)
        except _Invalid as exc:
            return error_response(error_info("invalid_request", str(exc)))
        except ServiceError as exc:
            return error_response(exc.info)
        lists, errors = await self.fan_out(subjects.ADAPTERS_UNLOAD, AdapterUnload(name=name))
        if not lists:
            return error_response(errors[0] if errors else error_info("no_capacity", "no worker answered"))
        self.fleet.forget(name)
        self.owners.release(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def _body(self, request: web.Request) -> dict[str, Any]:
        raw = bytearray()
        while len(raw) <= MAX_BODY_BYTES:  # read at most one byte past the bound
            chunk = await request.content.read(MAX_BODY_BYTES + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
        try:
            body = loads_bounded(bytes(raw), MAX_BODY_BYTES, max_depth=8)
        except BoundedJsonError as exc:
            raise _Invalid(f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _Invalid("the body must be a JSON object")
        return body

    def _name(self, body: dict[str, Any]) -> str:
        name = body.get("lora_name")
        try:
            return check_name(name)  # type: ignore[arg-type]
        except RegistryError as exc:
            raise _Invalid(f"lora_name: {_brief(exc)}") from None

    def _path(self, body: dict[str, Any]) -> str:
        path = body.get("lora_path")
        if not isinstance(path, str) or not path:
            raise _Invalid("lora_path must be a non-empty string")
        try:
            check_path_text(path)
        except RegistryError as exc:
            raise _Invalid(f"lora_path: {exc}") from None
        return path

    async def fan_out(self, subject: str, message: Message) -> tuple[list[AdapterList], list[ErrorInfo]]:
        """Publish ``message`` and collect the answers of every live worker (or until the timeout)."""
        expected = max(1, len(self.fleet.live_workers()))
        nc = self.bus.nc
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        lists: list[AdapterList] = []
        errors: list[ErrorInfo] = []
        try:
            await self.bus.publish(subject, message, reply=inbox)
            deadline = asyncio.get_running_loop().time() + self.timeout_s
            while len(lists) + len(errors) < expected:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                msg = await sub.next_msg(timeout=remaining)
                try:
                    lists.append(decode_reply(msg.data, AdapterList))
                except RemoteError as exc:
                    errors.append(exc.info)
                except SchemaError as exc:
                    logger.warning("bad answer on %s: %s", subject, exc)
        except (asyncio.TimeoutError, NatsError):
            pass
        finally:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()
        return lists, errors


class _Invalid(ValueError):
    """The registration request itself is malformed (400)."""


def _brief(exc: Exception, limit: int = 300) -> str:
    """An error message cut to ``limit`` characters (it may quote a huge input)."""
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."

