"""vLLM-compatible runtime adapter registration on the gateway's HTTP API.

* ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path", "pinned"?}``;
* ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``.

The gateway checks the request (the caller's API key, the name, and, when it knows the
adapter root, that the path stays inside it), then publishes AdapterLoad / AdapterUnload on
``caraserve.v1.adapters.load`` / ``.unload`` and collects every live worker's answer. Success
(200, a plain-text message as vLLM answers) when at least one worker took the change; else the
workers' error: a path outside the root, a name registered with another path, or an unusable
adapter are 400; unloading an unknown adapter is 404; no worker answering is 503. A loaded
adapter joins the catalog (the loading tenant may use it); an unloaded one leaves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from aiohttp import web
from nats.errors import Error as NatsError

from services.gateway.adapter_holders import AdapterHolders
from services.gateway.catalog import Catalog
from services.gateway.http_api import bearer_key, error_response
from services.gateway.tenancy import Tenancy
from services.gateway.worker_watch import WorkerWatch
from shared import subjects
from shared.adapter_registry import AdapterRegistry, RegistryError, check_name
from shared.bus import Bus
from shared.schemas import (AdapterList, AdapterLoad, AdapterUnload, ErrorInfo, Message, RemoteError, SchemaError,
                            ServiceError, decode_reply, error_info)

logger = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 5.0


class AdapterAdmin:
    """Handlers for the two registration routes, fanning out to the workers over NATS."""

    def __init__(self, bus: Bus, catalog: Catalog, tenancy: Tenancy, watch: WorkerWatch, holders: AdapterHolders,
                 adapter_dir: str = "", timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self.bus, self.catalog, self.tenancy, self.watch, self.holders = bus, catalog, tenancy, watch, holders
        self.registry = AdapterRegistry(adapter_dir) if adapter_dir else None
        self.timeout_s = timeout_s

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)

    async def load(self, request: web.Request) -> web.Response:
        try:
            tenant = self.tenancy.authenticate(bearer_key(request))
            body = await self._body(request)
            name, path = self._name(body), body.get("lora_path")
            if not isinstance(path, str) or not path:
                raise _Invalid("lora_path must be a non-empty string")
            if self.registry is not None:
                self.registry.safe_path(path)
        except (_Invalid, RegistryError) as exc:
            return error_response(error_info("invalid_request", str(exc)))
        except ServiceError as exc:
            return error_response(exc.info)
        message = AdapterLoad(name=name, path=path, pinned=bool(body.get("pinned", False)), owner=tenant)
        lists, errors = await self.fan_out(subjects.ADAPTERS_LOAD, message)
        if not lists:
            return error_response(errors[0] if errors else error_info("no_capacity", "no worker answered"))
        for listing in lists:
            self.catalog.merge(listing)
            self.holders.observe(listing.worker_id, listing.adapters)
        self.tenancy.grant(tenant, name)
        logger.info("adapter %s loaded from %s on %s", name, path, ", ".join(sorted(l.worker_id for l in lists)))
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        try:
            tenant = self.tenancy.authenticate(bearer_key(request))
            name = self._name(await self._body(request))
        except _Invalid as exc:
            return error_response(error_info("invalid_request", str(exc)))
        except ServiceError as exc:
            return error_response(exc.info)
        if not self.tenancy.may_use(tenant, name):
            return error_response(error_info("model_not_found", f"the model {name!r} does not exist"))
        lists, errors = await self.fan_out(subjects.ADAPTERS_UNLOAD, AdapterUnload(name=name))
        if not lists:
            return error_response(errors[0] if errors else error_info("no_capacity", "no worker answered"))
        self.catalog.remove(name)
        self.holders.forget(name)
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _Invalid(f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _Invalid("the body must be a JSON object")
        return body

    def _name(self, body: dict[str, Any]) -> str:
        name = body.get("lora_name")
        try:
            return check_name(name)  # type: ignore[arg-type]
        except RegistryError as exc:
            raise _Invalid(f"lora_name: {exc}") from None

    async def fan_out(self, subject: str, message: Message) -> tuple[list[AdapterList], list[ErrorInfo]]:
        """Publish ``message`` and collect the answers of every live worker (or until the timeout)."""
        expected = max(1, len(self.watch.live_workers()))
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

