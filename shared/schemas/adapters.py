"""Adapter management on ``adapters.load`` / ``adapters.unload`` / ``adapters.list``.

Each worker answers with an AdapterList: the adapters it holds after the operation.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.levels import LEVELS
from shared.schemas.names import NAME_PATTERN, WORKER_ID_PATTERN
from shared.schemas.wire import Message, Struct, spec


@dataclass
class AdapterInfo(Struct):
    """An adapter a worker holds: its rank and the tier it lives in (device, host or disk)."""

    name: str = spec(pattern=NAME_PATTERN)
    rank: int = spec(ge=1, le=1024)
    level: str = spec(choices=LEVELS)
    pinned: bool = False


@dataclass
class AdapterLoad(Message):
    """Load the PEFT adapter directory ``path`` under ``name`` (``pinned`` keeps it on device).

    ``owner`` is the tenant that registered it (None: registered by the operator).
    """

    KIND = "adapter_load"
    name: str = spec(pattern=NAME_PATTERN)
    path: str = spec(min_len=1, max_len=4096)
    pinned: bool = False
    owner: str | None = spec(None, min_len=1, max_len=128)


@dataclass
class AdapterUnload(Message):
    """Drop adapter ``name`` from every tier."""

    KIND = "adapter_unload"
    name: str = spec(pattern=NAME_PATTERN)


@dataclass
class AdapterListRequest(Message):
    """Ask the workers which adapters they hold."""

    KIND = "adapter_list_request"


@dataclass
class AdapterList(Message):
    """One worker's adapters (the reply to load, unload and list)."""

    KIND = "adapter_list"
    worker_id: str = spec(pattern=WORKER_ID_PATTERN)
    adapters: list[AdapterInfo] = spec(default_factory=list)
