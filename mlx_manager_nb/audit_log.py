"""The audit log: one SQLite row per request, written off the caller's thread.

Every request (HTTP, magic, widget or Python API) is recorded with ``record()``,
which only puts the row on a queue; a writer thread inserts queued rows in
batches into the ``requests`` table of ``audit.db`` under ``MLX_NB_HOME``::

    audit = AuditLog()
    audit.record({"source": "api", "protocol": "python", "model": "tiny",
                  "status": "ok", "duration": 0.8, "completion_tokens": 12})
    audit.query(model="tiny", status="error", limit=10)   # newest first
    audit.stats(since="2024-05-01")                        # per-model latency, error rate
    unsubscribe = audit.subscribe(print)                   # called for each committed row

Prompts and completions are only stored, in a separate ``contents`` table,
with ``log_content=True``.

The schema is versioned by :mod:`mlx_manager_nb.migrations`, which upgrades
an older database when it is opened.

A database that cannot be opened or written (locked, corrupt, unwritable)
never raises to ``record()``'s caller: it warns once (``RuntimeWarning``), the
message stays in ``AuditLog.error`` until a write succeeds again, and the rows
of the failed batch are dropped.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import queue
import sqlite3
import threading
import uuid
import warnings
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from statistics import fmean
from typing import Any, Callable

from sqlite_utils import Database

from .errors import MLXManagerError
from .migrations import COLUMNS, migrate
from .store import home

__all__ = ["AuditLog", "new_request_id", "utc_now"]

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500
#: Seconds a write waits for another process's lock before it fails.
BUSY_TIMEOUT = 5.0
BATCH_SIZE = 1000
#: Statuses that count as errors in ``stats()``; "cancelled" does not.
FAILED = ("error", "timeout")

_STOP = object()


def new_request_id() -> str:
    """A fresh request id, ``"req_"`` and 32 hex digits."""
    return "req_" + uuid.uuid4().hex


def utc_now() -> str:
    """The current UTC time as ISO-8601 text with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _iso(value: datetime | str) -> str:
    """``value`` as UTC ISO-8601 text in ``utc_now()``'s fixed format (naive times are local)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"not an ISO-8601 date or time: {value!r}") from None
    return value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _open(path: Path | str) -> Database:
    """Open (creating if needed) the audit database at ``path`` in WAL mode, migrated to the current schema."""
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT, check_same_thread=False)
    try:
        db = Database(conn)
        db.enable_wal()
        migrate(db)
    except BaseException:
        conn.close()
        raise
    return db


def _normalize(row: dict) -> dict:
    """A complete ``requests`` row from a caller's partial one (id and start time filled in)."""
    out = {name: None if row.get(name) is None else kind(row[name]) for name, kind in COLUMNS.items()}
    out["id"] = out["id"] or new_request_id()
    out["started_at"] = _iso(row["started_at"]) if row.get("started_at") else utc_now()
    if out["error_message"] is not None:
        out["error_message"] = out["error_message"][:MAX_ERROR_CHARS]
    return out


def _where(**filters: Any) -> tuple[str, list]:
    """A WHERE clause with ``?`` placeholders, and its parameters, for the non-None filters."""
    clauses, params = [], []
    for name, value in filters.items():
        if value is None:
            continue
        if name == "since":
            clauses.append("started_at >= ?")
            params.append(_iso(value))
        else:
            clauses.append(f"{name} = ?")
            params.append(value)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _percentile(values: list[float], p: float) -> float | None:
    """The ``p``-th percentile of ``values`` with linear interpolation; None if empty."""
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class AuditLog:
    """A request log in SQLite, written by a background thread.

    ``path`` defaults to ``$MLX_NB_HOME/audit.db`` (``MLX_NB_HOME`` defaults to
    the user cache directory); ``":memory:"`` keeps it in memory. After each
    batch, rows beyond the newest ``max_rows`` and rows older than
    ``max_age_days`` are deleted.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        log_content: bool = False,
        max_rows: int | None = None,
        max_age_days: float | None = None,
    ) -> None:
        self.path: Path | str = (
            home() / "audit.db" if path is None else path if path == ":memory:" else Path(path).expanduser()
        )
        self.log_content = log_content
        self.max_rows = max_rows
        self.max_age_days = max_age_days
        #: What is wrong with the database, or None while writes succeed.
        self.error: str | None = None
        self._warned = False
        self._db: Database | None = None
        self._db_lock = threading.Lock()  # guards the connection, shared by writer and readers
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition()  # guards _pending and _closed
        self._pending = 0
        self._closed = False
        self._subscribers: list[Callable[[dict], Any]] = []
        with self._db_lock:
            self._connect()
        self._writer = threading.Thread(target=self._run, name="mlx-nb-audit-writer", daemon=True)
        self._writer.start()
        atexit.register(self.close)

    @property
    def pending(self) -> int:
        """How many recorded rows are not yet written."""
        return self._pending

    def __repr__(self) -> str:
        options = "".join(
            f", {name}={getattr(self, name)!r}"
            for name in ("log_content", "max_rows", "max_age_days")
            if getattr(self, name)
        )
        state = "closed" if self._closed else f"pending={self._pending}"
        return f"AuditLog({str(self.path)!r}{options}) <{state}, error={self.error!r}>"

    def record(self, row: dict, content: dict | None = None) -> None:
        """Queue one request's row for writing; never blocks, never raises.

        ``row`` holds any of the ``requests`` columns (others are ignored); ``id``
        defaults to ``new_request_id()`` and ``started_at`` (datetime or ISO text)
        to now. ``content`` (``{"prompt": messages or text, "completion": text}``)
        is stored only with ``log_content=True``. A row that cannot be stored
        (say a non-numeric token count) is dropped and logged; rows recorded
        after ``close()`` are dropped.
        """
        try:
            item = _normalize(row)
            stored = None
            if self.log_content and content is not None:
                stored = {
                    "request_id": item["id"],
                    "prompt": json.dumps(content.get("prompt"), ensure_ascii=False, default=str),
                    "completion": content.get("completion"),
                }
            with self._cond:
                if self._closed:
                    return
                self._pending += 1
                self._queue.put((item, stored))
        except Exception as e:
            log.warning("audit row dropped: %r (%s)", row, e)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Wait until every recorded row is written (or dropped); False on timeout."""
        if threading.current_thread() is self._writer:  # a subscriber must not wait on itself
            return self._pending == 0
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Write pending rows, stop the writer thread and close the database."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._writer.join(timeout)
        atexit.unregister(self.close)
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def subscribe(self, callback: Callable[[dict], Any]) -> Callable[[], None]:
        """Call ``callback(row)`` for each row once committed; returns the unsubscribe function.

        Callbacks run on the writer thread: keep them short, and hop to your own
        loop to touch widgets (e.g. ``loop.call_soon_threadsafe``). Exceptions
        are logged and otherwise ignored.
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def query(
        self,
        since: datetime | str | None = None,
        model: str | None = None,
        status: str | None = None,
        source: str | None = None,
        client_request_id: str | None = None,
        limit: int | None = 100,
    ) -> list[dict]:
        """Rows matching every given filter, newest first (``limit=None``: all).

        Pending rows are written first. ``since`` is a datetime or ISO-8601 text
        (naive means local time); other filters match exactly.
        """
        self.flush()
        where, params = _where(
            since=since, model=model, status=status, source=source, client_request_id=client_request_id
        )
        rows = self._read(
            f"SELECT * FROM requests{where} ORDER BY started_at DESC, rowid DESC LIMIT ?",
            [*params, -1 if limit is None else int(limit)],
        )
        for row in rows:
            if row["stream"] is not None:
                row["stream"] = bool(row["stream"])
        return rows

    def stats(
        self, since: datetime | str | None = None, model: str | None = None, source: str | None = None
    ) -> list[dict]:
        """Per-model summary, busiest model first.

        Keys: ``model``, ``requests``, ``errors`` (status error or timeout),
        ``error_rate``, ``p50_duration``, ``p95_duration``, ``p50_ttft``,
        ``p95_ttft`` and ``mean_tokens_per_second``; the timings are over
        successful (``ok``) requests and None where there are none.
        """
        self.flush()
        where, params = _where(since=since, model=model, source=source)
        groups: dict[str | None, list[dict]] = defaultdict(list)
        for row in self._read(
            f"SELECT model, status, duration, ttft, tokens_per_second FROM requests{where}", params
        ):
            groups[row["model"]].append(row)
        result = []
        for name, rows in groups.items():
            ok = [r for r in rows if r["status"] == "ok"]
            duration, ttft, tps = (
                [r[c] for r in ok if r[c] is not None] for c in ("duration", "ttft", "tokens_per_second")
            )
            errors = sum(r["status"] in FAILED for r in rows)
            result.append(
                {
                    "model": name,
                    "requests": len(rows),
                    "errors": errors,
                    "error_rate": errors / len(rows),
                    "p50_duration": _percentile(duration, 50),
                    "p95_duration": _percentile(duration, 95),
                    "p50_ttft": _percentile(ttft, 50),
                    "p95_ttft": _percentile(ttft, 95),
                    "mean_tokens_per_second": fmean(tps) if tps else None,
                }
            )
        return sorted(result, key=lambda s: (-s["requests"], str(s["model"])))

    def to_dataframe(self, **filters: Any):
        """``query(**filters)`` as a pandas DataFrame (needs pandas)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("AuditLog.to_dataframe() needs pandas: pip install pandas") from e
        return pd.DataFrame(self.query(**filters), columns=list(COLUMNS))

    def _connect(self) -> Database | None:
        """The open database, opening it if needed; None (and ``error`` set) if it cannot be.

        The caller holds ``_db_lock``.
        """
        if self._db is None:
            try:
                self._db = _open(self.path)
            except Exception as e:
                self._fail(e)
        return self._db

    def _fail(self, e: Exception) -> None:
        self.error = f"{type(e).__name__}: {e}"
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"audit log {self.path} is not usable, requests are not recorded: {self.error}",
                RuntimeWarning,
                stacklevel=3,
            )

    def _read(self, sql: str, params: list) -> list[dict]:
        with self._db_lock:
            db = self._connect()
            if db is None:
                raise MLXManagerError(f"audit log {self.path} cannot be read: {self.error}")
            return list(db.query(sql, params))

    def _run(self) -> None:
        """The writer thread: write queued rows in batches until ``close()``."""
        while True:
            batch = [self._queue.get()]
            while len(batch) < BATCH_SIZE:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items = [item for item in batch if item is not _STOP]
            try:
                if items:
                    self._write(items)
            except Exception:  # never let the writer die: flush() would hang
                log.exception("audit writer failed")
            finally:
                with self._cond:
                    self._pending -= len(items)
                    self._cond.notify_all()
            if len(items) < len(batch):
                return

    def _write(self, items: list[tuple[dict, dict | None]]) -> None:
        rows = [row for row, _ in items]
        with self._db_lock:
            db = self._connect()
            if db is None:
                return
            try:
                # IMMEDIATE takes the write lock up front, waiting up to BUSY_TIMEOUT for
                # another process; a plain BEGIN would fail at once when upgrading to write.
                db.execute("BEGIN IMMEDIATE")
                db["requests"].insert_all(rows, replace=True)
                contents = [content for _, content in items if content is not None]
                if contents:
                    db["contents"].insert_all(contents, replace=True)
                self._prune(db)
                db.commit()
            except Exception as e:
                db.rollback()
                self._fail(e)
                return
            self.error = None
        for callback in list(self._subscribers):
            for row in rows:
                try:
                    callback(dict(row))
                except Exception:
                    log.exception("audit subscriber %r failed", callback)

    def _prune(self, db: Database) -> None:
        if self.max_age_days is None and self.max_rows is None:
            return
        if self.max_age_days is not None:
            cutoff = datetime.now(timezone.utc) - timedelta(days=self.max_age_days)
            db.execute("DELETE FROM requests WHERE started_at < ?", [_iso(cutoff)])
        if self.max_rows is not None:
            db.execute(
                "DELETE FROM requests WHERE rowid IN (SELECT rowid FROM requests"
                " ORDER BY started_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
                [self.max_rows],
            )
        db.execute("DELETE FROM contents WHERE request_id NOT IN (SELECT id FROM requests)")
