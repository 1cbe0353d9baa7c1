"""The gateway's journal of requests in flight, so that a restarted gateway can end them.

A NATS API client's chunks come from the gateway that accepted its request, and only that
gateway knows the request exists. If the gateway is killed, the client would wait forever
and the worker would go on generating for nobody. So each request in flight is a row of a
SQLite file: its id, the client's reply subject (NATS API requests only), the worker it was
placed on and the index of the next chunk the client is due. A gateway that starts on the
same file (``GatewayConfig.journal``; the supervisor restarts it with the same one) takes the
rows its predecessor left (:meth:`StreamJournal.take_orphans`), sends each NATS client a
final ``gateway_restarted`` error chunk and tells each worker to cancel.

Writes are not synced to disk: the journal must survive its process being killed, not the
machine losing power, and the page cache is enough for that. Without a file the journal
lives in memory (nothing survives, nothing is written).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

IN_MEMORY = ":memory:"
_SCHEMA = """CREATE TABLE IF NOT EXISTS streams (
    request_id TEXT PRIMARY KEY,
    reply_to TEXT,
    worker_id TEXT,
    next_index INTEGER NOT NULL DEFAULT 0)"""


@dataclass(frozen=True)
class Orphan:
    """A request a previous gateway process left in flight."""

    request_id: str
    reply_to: str | None  # the NATS client's inbox; None for an HTTP request (its connection died)
    worker_id: str | None  # None if it was never placed
    next_index: int  # the index its final chunk must carry


class StreamJournal:
    """Rows of requests in flight, in a SQLite file (or in memory for ``path`` ":memory:")."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = _open(path)

    def opened(self, request_id: str, reply_to: str | None) -> None:
        self._write("INSERT OR REPLACE INTO streams (request_id, reply_to) VALUES (?, ?)", request_id, reply_to)

    def placed(self, request_id: str, worker_id: str) -> None:
        self._write("UPDATE streams SET worker_id = ? WHERE request_id = ?", worker_id, request_id)

    def sent(self, request_id: str, next_index: int) -> None:
        """The client has been sent every chunk before ``next_index``."""
        self._write("UPDATE streams SET next_index = ? WHERE request_id = ?", next_index, request_id)

    def closed(self, request_id: str) -> None:
        self._write("DELETE FROM streams WHERE request_id = ?", request_id)

    def take_orphans(self) -> list[Orphan]:
        """The rows left by a previous process, removed from the journal."""
        rows = self._db.execute("SELECT request_id, reply_to, worker_id, next_index FROM streams").fetchall()
        self._write("DELETE FROM streams")
        return [Orphan(*row) for row in rows]

    def close(self) -> None:
        self._db.close()

    def _write(self, statement: str, *values: object) -> None:
        try:
            with self._db:
                self._db.execute(statement, values)
        except sqlite3.Error as exc:  # a full disk must not fail requests: only recovery is lost
            logger.warning("stream journal %s: %s", self.path, exc)


def _open(path: str) -> sqlite3.Connection:
    """The journal's connection; a file that is not a usable journal is replaced (logged)."""
    try:
        return _connect(path)
    except sqlite3.DatabaseError as exc:
        logger.warning("stream journal %s is unreadable (%s); starting a new one", path, exc)
        Path(path).unlink(missing_ok=True)
        return _connect(path)


def _connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute(_SCHEMA)
    return db
