"""The stream journal: rows follow a request's life, survive the process, and a bad file is replaced."""

from __future__ import annotations

import sqlite3

from services.gateway.stream_journal import IN_MEMORY, Orphan, StreamJournal


def test_rows_follow_open_place_send_close(tmp_path):
    path = str(tmp_path / "gw.journal")
    journal = StreamJournal(path)
    journal.opened("nats-1", "_INBOX.client.c.abc")
    journal.opened("http-1", None)
    journal.placed("nats-1", "worker-0")
    journal.sent("nats-1", 7)
    journal.opened("done", "_INBOX.client.c.def")
    journal.closed("done")
    # a second connection on the same file, as a restarted process would open it
    orphans = sorted(StreamJournal(path).take_orphans(), key=lambda o: o.request_id)
    assert orphans == [Orphan("http-1", None, None, 0), Orphan("nats-1", "_INBOX.client.c.abc", "worker-0", 7)]
    assert StreamJournal(path).take_orphans() == []  # taken once


def test_in_memory_journal_starts_empty():
    journal = StreamJournal(IN_MEMORY)
    journal.opened("a", None)
    assert StreamJournal(IN_MEMORY).take_orphans() == []
    assert [o.request_id for o in journal.take_orphans()] == ["a"]


def test_an_unreadable_file_is_replaced(tmp_path):
    path = tmp_path / "gw.journal"
    path.write_bytes(b"not a database" * 100)
    journal = StreamJournal(str(path))
    assert journal.take_orphans() == []
    journal.opened("a", None)
    assert [o.request_id for o in StreamJournal(str(path)).take_orphans()] == ["a"]


def test_a_failing_write_is_logged_not_raised(tmp_path, caplog):
    journal = StreamJournal(str(tmp_path / "gw.journal"))
    journal._db.execute("DROP TABLE streams")
    journal.opened("a", None)  # no table: sqlite3.OperationalError, logged
    assert "stream journal" in caplog.text
    assert isinstance(journal._db, sqlite3.Connection)
