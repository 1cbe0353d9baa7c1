"""One wildcard inbox subscription that delivers every request's chunks to that request's queue.

Each attempt of a request gets its own key (``<prefix>.<key>``), so chunks from a worker the
gateway gave up on land on a closed key and are dropped.
"""

from __future__ import annotations

import asyncio
import itertools

from nats.aio.msg import Msg

from shared.bus import Bus
from shared.schemas import Chunk


class ChunkInbox:
    """Demultiplexes chunks arriving on ``<prefix>.*`` by their subject's last token."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.prefix = ""
        self._queues: dict[str, asyncio.Queue] = {}
        self._keys = itertools.count()

    async def start(self) -> None:
        self.prefix = self.bus.nc.new_inbox()
        await self.bus.listen(f"{self.prefix}.*", Chunk, self._on_chunk)

    def _on_chunk(self, chunk: Chunk, msg: Msg) -> None:
        queue = self._queues.get(msg.subject[len(self.prefix) + 1:])
        if queue is not None:
            queue.put_nowait(chunk)

    def open(self) -> tuple[str, str, asyncio.Queue]:
        """A new (key, inbox subject, queue) for one attempt."""
        key = str(next(self._keys))
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[key] = queue
        return key, f"{self.prefix}.{key}", queue

    def close(self, key: str) -> None:
        self._queues.pop(key, None)

    def __len__(self) -> int:
        return len(self._queues)
