"""Stored Responses API responses: ``$MLX_NB_HOME/responses.db``, so ``previous_response_id`` continues them.

One row per stored response: its JSON as the client got it (``response``) and the conversation
it answered (``context``: the input items, those of earlier turns first). A later turn that names
it reads ``context`` and the response's ``output`` back as its own history.

The database is its own file, not a table of ``audit.db``: the audit log only appends, prunes by
age and count, and holds no content unless ``log_content=True``, while stored responses are
conversations a client reads and deletes by id, needed whether or not there is an audit log. It
is opened like the audit log (folder 0700, files 0600, WAL) and versioned by the same migrations
mechanism, in its own ``_responses_migrations`` table.

Every access runs on the store's one worker thread, in order: ``put()`` only queues the write and
never blocks the event loop, and a ``get()`` made after it reads what it wrote.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlite_utils import Database

from .audit_log import open_database
from .migrations import Migration, migrate
from .store import home

__all__ = ["ResponseStore", "Stored"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def m001_responses(db: Database) -> None:
    """The responses table."""
    db.table("responses").create({"id": str, "created_at": float, "model": str, "status": str, "context": str,
                            "response": str}, pk="id", if_not_exists=True)


def m002_created_at_index(db: Database) -> None:
    """An index for pruning by age."""
    db.table("responses").create_index(["created_at"], if_not_exists=True)


def m003_size(db: Database) -> None:
    """Each row's size in bytes, and an index that sums sizes newest first without reading the rows."""
    db.execute("ALTER TABLE responses ADD COLUMN size INTEGER NOT NULL DEFAULT 0")
    db.execute("UPDATE responses SET size = length(CAST(context AS BLOB)) + length(CAST(response AS BLOB))")
    db.table("responses").create_index(["created_at", "size"], if_not_exists=True)


# append new ones; never edit one that has shipped
MIGRATIONS: list[Migration] = [m001_responses, m002_created_at_index, m003_size]
MAX_AGE_DAYS = 30.0  # how long OpenAI keeps a stored response
MAX_COUNT = 10_000  # responses kept at most, the oldest dropped first
MAX_BYTES = 256 * 2**20  # bytes of stored JSON kept at most, the oldest dropped first
PRUNE_EVERY = 3600.0  # seconds between prunes while responses are being stored


@dataclass(frozen=True)
class Stored:
    """A stored response and the input items it answered, oldest first."""

    response: dict
    context: list[dict]


class ResponseStore:
    """Responses kept in SQLite (default ``$MLX_NB_HOME/responses.db``), opened on first use.

    Responses older than ``max_age_days`` (30, as OpenAI keeps them; None keeps them all) are never
    returned, and are deleted when the store opens, then at most hourly as it is used. Beyond
    ``max_count`` responses (10,000) or ``max_bytes`` of their JSON (256 MiB), each write drops the
    oldest ones (never the one just written); None lifts a cap. SQLite reuses the freed pages, so
    the file stops growing at about the cap.
    """

    def __init__(self, path: str | Path | None = None, max_age_days: float | None = MAX_AGE_DAYS,
                 max_count: int | None = MAX_COUNT, max_bytes: int | None = MAX_BYTES) -> None:
        self.path = Path(path).expanduser() if path is not None else home() / "responses.db"
        self.max_age_days, self.max_count, self.max_bytes = max_age_days, max_count, max_bytes
        self._db: Database | None = None
        self._pruned = 0.0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-nb-responses")

    def __repr__(self) -> str:
        return f"ResponseStore({str(self.path)!r})"

    def put(self, response: dict, context: list[dict]) -> None:
        """Store (or replace) ``response`` with its ``context``; queued (neither may change after), never
        blocks. A failed write is logged."""
        try:
            self._submit(self._put, response, context).add_done_callback(_log_failure)
        except RuntimeError as e:  # closed: the server is gone
            log.warning("response %s not stored: %s", response["id"], e)

    async def get(self, response_id: str) -> Stored | None:
        """The stored response with this id, or None."""
        return await asyncio.wrap_future(self._submit(self._get, response_id))

    async def delete(self, response_id: str) -> bool:
        """Delete a stored response; whether there was one."""
        return await asyncio.wrap_future(self._submit(self._delete, response_id))

    def close(self) -> None:
        """Close the database once the queued writes are done; returns at once."""
        try:
            self._submit(self._close)
        except RuntimeError:  # interpreter exit: the worker has already finished its queue and stopped
            self._close()
        self._worker.shutdown(wait=False)

    def _submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        return self._worker.submit(fn, *args)

    def _open(self) -> Database:
        if self._db is None:
            self._db = open_database(self.path, lambda db: migrate(db, MIGRATIONS, "_responses_migrations"))
        if self.max_age_days is not None and time.time() - self._pruned > PRUNE_EVERY:
            self._pruned = time.time()
            try:
                with self._db.conn as conn:
                    conn.execute("DELETE FROM responses WHERE created_at < ?", [self._cutoff()])
            except sqlite3.Error as e:  # a read-only or busy file: the request it serves goes on
                log.warning("expired responses not deleted from %s: %s", self.path, e)
        return self._db

    def _cutoff(self) -> float:
        """Responses created before this time have expired."""
        return time.time() - self.max_age_days * 86400 if self.max_age_days is not None else float("-inf")

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _put(self, response: dict, context: list[dict]) -> None:
        row = {"id": response["id"], "created_at": response["created_at"], "model": response["model"],
               "status": response["status"], "context": json.dumps(context, ensure_ascii=False),
               "response": json.dumps(response, ensure_ascii=False)}
        row["size"] = len(row["context"].encode()) + len(row["response"].encode())
        with self._open().conn as conn:
            conn.execute("INSERT OR REPLACE INTO responses (id, created_at, model, status, context, response, size) "
                         "VALUES (:id, :created_at, :model, :status, :context, :response, :size)", row)
            self._drop_oldest(conn, row["id"])

    def _drop_oldest(self, conn: sqlite3.Connection, kept: str) -> None:
        """Delete the oldest responses beyond ``max_count`` or ``max_bytes``, never ``kept`` (the newest)."""
        if self.max_count is None and self.max_bytes is None:
            return
        count = self.max_count if self.max_count is not None else -1
        size = self.max_bytes if self.max_bytes is not None else -1
        conn.execute("DELETE FROM responses WHERE id != ? AND rowid IN (SELECT r FROM ("
                     " SELECT rowid AS r, row_number() OVER newest AS n, sum(size) OVER newest AS total"
                     " FROM responses WINDOW newest AS (ORDER BY created_at DESC, rowid DESC))"
                     " WHERE (? >= 0 AND n > ?) OR (? >= 0 AND total > ?))", [kept, count, count, size, size])

    def _get(self, response_id: str) -> Stored | None:
        rows = list(self._open().query("SELECT context, response FROM responses WHERE id = ? AND created_at >= ?",
                                       [response_id, self._cutoff()]))
        if not rows:
            return None
        return Stored(json.loads(rows[0]["response"]), json.loads(rows[0]["context"]))

    def _delete(self, response_id: str) -> bool:
        with self._open().conn as conn:
            return conn.execute("DELETE FROM responses WHERE id = ?", [response_id]).rowcount > 0


def _log_failure(future: Future) -> None:
    if future.exception() is not None:
        log.warning("a response could not be stored: %s", future.exception())
