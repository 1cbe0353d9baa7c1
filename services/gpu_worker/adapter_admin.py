"""Runtime adapter registration on a worker: ``adapters.load``, ``.unload`` and ``.list`` over NATS.

Every worker answers every request (no queue group), each with an :class:`AdapterList`:
the adapters it holds after the operation and the tier each is in. Bad input gets a typed
error reply and changes nothing:

* a path outside the worker's adapter root (traversal, absolute path, symlink escape) or
  with NUL / too many characters, a name already registered with another path, an
  unreadable or unsupported adapter (bad config, a pattern RE2 cannot compile, tensors
  whose shapes do not fit the base model, NaN or Inf weights): ``invalid_request`` (HTTP 400);
* unloading a name the worker does not hold: ``model_not_found`` (HTTP 404).

Unloading lets the adapter's running requests finish; requests arriving later get
unknown-adapter. Registering reads and checks the adapter's files (weights included), so it
runs off the event loop. Who may register or unload which adapter is the gateway's check
(``services/gateway/adapter_owners.py``); ``owner`` is recorded with the adapter.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

from nats.aio.msg import Msg

from services.gpu_worker.adapter_manager import AdapterManager

from shared import subjects
from shared.adapter_registry import AdapterNotFoundError, AdapterRecord, RegistryError
from shared.bus import Bus
from shared.peft_adapter import AdapterError
from shared.schemas import AdapterInfo, AdapterList, AdapterListRequest, AdapterLoad, AdapterUnload, ServiceError

log = logging.getLogger(__name__)


@runtime_checkable
class RuntimeAdapters(Protocol):
    """An adapter manager that takes adapters at runtime (``TieredAdapters``)."""

    def register(self, name: str, path: str | Path, pinned: bool = False, owner: str | None = None
                 ) -> AdapterRecord:
        """Register ``name`` at ``path``; RegistryError / AdapterError on bad input."""

    def unregister(self, name: str) -> AdapterRecord:
        """Unload ``name``; AdapterNotFoundError if unknown."""

    def adapter_infos(self) -> list[AdapterInfo]:
        """Every registered adapter with its tier."""


class AdapterAdmin:
    """Serves the ``adapters.*`` subjects for one worker's adapter manager."""

    def __init__(self, worker_id: str, adapters: AdapterManager) -> None:
        self.worker_id, self.adapters = worker_id, adapters

    async def serve(self, bus: Bus) -> None:
        await bus.serve(subjects.ADAPTERS_LOAD, AdapterLoad, self.on_load)
        await bus.serve(subjects.ADAPTERS_UNLOAD, AdapterUnload, self.on_unload)
        await bus.serve(subjects.ADAPTERS_LIST, AdapterListRequest, self.on_list)

    def _manager(self) -> RuntimeAdapters:
        if not isinstance(self.adapters, RuntimeAdapters):
            raise ServiceError("invalid_request", f"worker {self.worker_id} has a fixed adapter set "
                                                  "(start it with --adapter-dir to load adapters at runtime)")
        return self.adapters

    async def on_load(self, load: AdapterLoad, msg: Msg | None = None) -> AdapterList:
        manager = self._manager()
        try:
            record = await asyncio.to_thread(manager.register, load.name, load.path, load.pinned, load.owner)
        except (RegistryError, AdapterError) as exc:
            raise ServiceError("invalid_request", str(exc)) from None
        log.info("adapter %s registered from %s (rank %d, %d bytes%s)", record.name, record.path, record.rank,
                 record.nbytes, ", pinned" if record.pinned else "")
        return self.listing()

    async def on_unload(self, unload: AdapterUnload, msg: Msg | None = None) -> AdapterList:
        try:
            self._manager().unregister(unload.name)
        except AdapterNotFoundError as exc:
            raise ServiceError("model_not_found", str(exc)) from None
        return self.listing()

    async def on_list(self, request: AdapterListRequest, msg: Msg | None = None) -> AdapterList:
        return self.listing()

    def listing(self) -> AdapterList:
        if isinstance(self.adapters, RuntimeAdapters):
            adapters = self.adapters.adapter_infos()
        else:
            adapters = [AdapterInfo(name=n, rank=self.adapters.rank(n), level="device") for n in self.adapters.names()]
        return AdapterList(worker_id=self.worker_id, adapters=adapters)
