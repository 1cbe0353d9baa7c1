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

from nats.aio.msg import Msg

from services.gpu_worker.residency.protocol import AdapterResidency
from shared import subjects
from shared.adapter_registry import AdapterNotFoundError, RegistryError
from shared.bus import Bus
from shared.peft_adapter import AdapterError
from shared.schemas import AdapterList, AdapterListRequest, AdapterLoad, AdapterUnload, ServiceError

log = logging.getLogger(__name__)


class AdapterAdmin:
    """Serves the ``adapters.*`` subjects for one worker's adapter manager."""

    def __init__(self, worker_id: str, residency: AdapterResidency) -> None:
        self.worker_id, self.residency = worker_id, residency

    async def serve(self, bus: Bus) -> None:
        await bus.serve(subjects.ADAPTERS_LOAD, AdapterLoad, self.on_load)
        await bus.serve(subjects.ADAPTERS_UNLOAD, AdapterUnload, self.on_unload)
        await bus.serve(subjects.ADAPTERS_LIST, AdapterListRequest, self.on_list)

    async def on_load(self, load: AdapterLoad, msg: Msg | None = None) -> AdapterList:
        try:
            record = await asyncio.to_thread(self.residency.register, load.name, load.path, load.pinned, load.owner)
        except (RegistryError, AdapterError) as exc:
            raise ServiceError("invalid_request", str(exc)) from None
        log.info("adapter %s registered from %s (rank %d, %d bytes%s)", record.name, record.path, record.rank,
                 record.nbytes, ", pinned" if record.pinned else "")
        return self.listing()

    async def on_unload(self, unload: AdapterUnload, msg: Msg | None = None) -> AdapterList:
        try:
            self.residency.unregister(unload.name)
        except AdapterNotFoundError as exc:
            raise ServiceError("model_not_found", str(exc)) from None
        return self.listing()

    async def on_list(self, request: AdapterListRequest, msg: Msg | None = None) -> AdapterList:
        return self.listing()

    def listing(self) -> AdapterList:
        return AdapterList(worker_id=self.worker_id, adapters=self.residency.adapter_infos())
