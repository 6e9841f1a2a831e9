"""Schema migrations of the audit database, applied in order, each once.

As in llm's ``migrations.py``: the ``_audit_migrations`` table holds the name of
every migration applied, and ``migrate(db)`` runs the others in the order they
are defined here, each recorded in the same transaction as its change. A
database written before migrations existed has the tables of migration 1 and
no ``_audit_migrations`` table; migration 1 creates its tables only if they
are missing, so such a database is recognised as version 1 and upgraded.

A new ``requests`` column is one line at the end of this module, and then is
part of ``COLUMNS`` (what ``AuditLog`` writes and reads)::

    add_column("tool_calls", int)

Other changes are functions decorated with ``@migration``. A migration that has
shipped is never edited, renamed or moved: add a new one.

Another database reuses the mechanism with its own list and table:
``migrate(db, [m001_mine, ...], "_mine_migrations")``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

from sqlite_utils import Database

__all__ = ["COLUMNS", "MIGRATIONS", "add_column", "applied", "migrate", "migration"]

MIGRATIONS_TABLE = "_audit_migrations"

Migration = Callable[[Database], None]
#: Every migration, in the order they are applied.
MIGRATIONS: list[Migration] = []

#: Column name -> type of the ``requests`` table as migration 1 creates it. Frozen: never edit.
_INITIAL_COLUMNS: dict[str, type] = {
    "id": str,
    "started_at": str,
    "source": str,  # http / magic / widget / api
    "endpoint": str,
    "protocol": str,  # openai / anthropic / python
    "model": str,
    "stream": bool,
    "status": str,  # ok / error / cancelled / timeout
    "http_status": int,
    "error_type": str,
    "error_message": str,
    "prompt_tokens": int,
    "completion_tokens": int,
    "ttft": float,
    "duration": float,
    "tokens_per_second": float,
    "finish_reason": str,
    "client": str,
    "user_agent": str,
}
#: Column name -> type of the ``requests`` table once every migration has run, in table order.
COLUMNS: dict[str, type] = dict(_INITIAL_COLUMNS)


def migration(fn: Migration) -> Migration:
    """Register ``fn(db)`` as the next migration, recorded under its function name."""
    if any(m.__name__ == fn.__name__ for m in MIGRATIONS):
        raise ValueError(f"a migration named {fn.__name__!r} already exists")
    MIGRATIONS.append(fn)
    return fn


def add_column(name: str, kind: type, *, index: bool = False) -> None:
    """Register a migration adding column ``name`` (with an index if asked) to ``requests``, and add it to COLUMNS."""

    def fn(db: Database) -> None:
        table = db.table("requests")
        if name not in table.columns_dict:  # idempotent, should a partial run have added it
            table.add_column(name, kind)
        if index:
            table.create_index([name], if_not_exists=True)

    fn.__name__ = f"add_requests_{name}"
    migration(fn)
    COLUMNS[name] = kind


def applied(db: Database, table: str = MIGRATIONS_TABLE) -> list[str]:
    """The names of the migrations applied to ``db`` (as recorded in ``table``), oldest first."""
    if not db[table].exists():
        return []
    return [row["name"] for row in db.query(f"SELECT name FROM {table} ORDER BY rowid")]


def migrate(db: Database, migrations: list[Migration] | None = None, table: str = MIGRATIONS_TABLE) -> None:
    """Apply the pending ``migrations`` (default: the audit log's) to ``db`` in one transaction,
    recorded in ``table``; a no-op (and no write) if none are pending.

    ``BEGIN IMMEDIATE`` makes two processes opening the same database at once
    migrate it one after the other.
    """
    migrations = MIGRATIONS if migrations is None else migrations
    if {m.__name__ for m in migrations} <= set(applied(db, table)):
        return
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        db.table(table).create({"name": str, "applied_at": str}, pk="name", if_not_exists=True)
        done = set(applied(db, table))  # again, under the lock: another process may have migrated meanwhile
        for fn in migrations:
            if fn.__name__ not in done:
                fn(db)
                db.conn.execute(
                    f"INSERT INTO {table} (name, applied_at) VALUES (?, ?)",
                    [fn.__name__, datetime.now(timezone.utc).isoformat()],
                )
        db.conn.commit()
    except BaseException:
        db.conn.rollback()
        raise


@migration
def m001_initial(db: Database) -> None:
    """The tables as they were before migrations (left alone where they exist)."""
    db.table("requests").create(_INITIAL_COLUMNS, pk="id", if_not_exists=True)
    db.table("requests").create_index(["started_at"], if_not_exists=True)
    db.table("contents").create({"request_id": str, "prompt": str, "completion": str}, pk="request_id",
                                if_not_exists=True)


# The id the client sent (x-request-id); the row's own id is always generated by the library.
add_column("client_request_id", str, index=True)

# Tools and structured output: how many calls the model made, their names (comma-separated), and
# whether a grammar constrained the text.
add_column("tool_calls", int)
add_column("tool_names", str)
add_column("constrained", bool)

# Requests one row stands for: 1, or how many refused 401s of one client in one hour (see audit_log).
add_column("count", int)

# Prompt tokens taken from the prompt cache (memory, disk or a shared prefix) instead of computed.
add_column("cached_tokens", int)

# Images in the request, and their bytes as sent (never their content: see audit_log).
add_column("images", int)
add_column("image_bytes", int)
