"""Adapter management on ``adapters.load`` / ``adapters.unload`` / ``adapters.list``.

Each worker answers with an AdapterList: the adapters it holds after the operation.
"""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta

from shared.levels import LEVELS
from shared.schemas.names import Name, WorkerId
from shared.schemas.wire import Message, Struct, default


class AdapterInfo(Struct):
    """An adapter a worker holds: its rank and the tier it lives in (device, host or disk)."""

    name: Name
    rank: Annotated[int, Meta(ge=1, le=1024)]
    level: Literal[LEVELS]
    pinned: bool = default(False)


class AdapterLoad(Message):
    """Load the PEFT adapter directory ``path`` under ``name`` (``pinned`` keeps it on device).

    ``owner`` is the tenant that registered it (None: registered by the operator).
    """

    KIND = "adapter_load"
    name: Name
    path: Annotated[str, Meta(min_length=1, max_length=4096)]
    pinned: bool = default(False)
    owner: Annotated[str, Meta(min_length=1, max_length=128)] | None = None


class AdapterUnload(Message):
    """Drop adapter ``name`` from every tier."""

    KIND = "adapter_unload"
    name: Name


class AdapterListRequest(Message):
    """Ask the workers which adapters they hold."""

    KIND = "adapter_list_request"


class AdapterList(Message):
    """One worker's adapters (the reply to load, unload and list)."""

    KIND = "adapter_list"
    worker_id: WorkerId
    adapters: list[AdapterInfo] = default([])
