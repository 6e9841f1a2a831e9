import errno
import logging
import os
import shutil
import sqlite3
import stat
import sys
import threading
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from mlx_manager_nb import audit_log as audit_module
from mlx_manager_nb import migrations
from mlx_manager_nb.audit_log import AuditLog, new_request_id, utc_now
from mlx_manager_nb.errors import MLXManagerError

INJECTION = "x' OR 1=1 --"
FIXTURE_V0 = Path(__file__).parent / "fixtures" / "audit_v0.db"


def ago(**delta) -> str:
    return (datetime.now(timezone.utc) - timedelta(**delta)).isoformat()


def count(path, table="requests") -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_default_path_is_under_mlx_nb_home(isolated_home):
    log = AuditLog()
    log.record({"model": "m", "status": "ok"})
    log.close()
    assert log.path == isolated_home / "audit.db"
    assert count(log.path) == 1


def test_empty_database_has_typed_tables(audit):
    assert audit.query() == []
    assert audit.stats() == []
    with sqlite3.connect(audit.path) as conn:
        types = {r[1]: r[2] for r in conn.execute("PRAGMA table_info(requests)")}
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert types["id"] == "TEXT"
    assert types["stream"] == "INTEGER"
    assert types["duration"] == "REAL"
    assert types["prompt_tokens"] == "INTEGER"


@pytest.mark.parametrize("source", ["http", "magic", "widget", "api"])
@pytest.mark.parametrize("status", ["ok", "error", "cancelled", "timeout"])
def test_row_for_each_status_and_source(audit, source, status):
    rid = new_request_id()
    audit.record(
        {
            "id": rid,
            "source": source,
            "endpoint": "/v1/chat/completions",
            "protocol": "openai",
            "model": "tiny",
            "stream": 1,
            "status": status,
            "http_status": 200 if status == "ok" else 500,
            "error_type": None if status == "ok" else "EngineError",
            "error_message": None if status == "ok" else "x" * 2000,
            "prompt_tokens": 5,
            "completion_tokens": 7,
            "ttft": 0.1,
            "duration": 0.5,
            "tokens_per_second": 14.0,
            "finish_reason": "stop",
            "client": "127.0.0.1",
            "user_agent": "pytest",
            "not_a_column": "ignored",
        }
    )
    [row] = audit.query()
    assert row["id"] == rid and row["source"] == source and row["status"] == status
    assert row["stream"] is True
    assert row["duration"] == 0.5 and row["prompt_tokens"] == 5
    assert "not_a_column" not in row
    if status != "ok":
        assert row["error_type"] == "EngineError"
        assert len(row["error_message"]) == audit_module.MAX_ERROR_CHARS


def test_id_and_started_at_default(audit):
    before = utc_now()
    audit.record({"model": "m"})
    [row] = audit.query()
    assert row["id"].startswith("req_") and len(row["id"]) == 36
    assert before <= row["started_at"] <= utc_now()


def test_newest_first(audit):
    for minutes in (5, 1, 3):
        audit.record({"id": f"r{minutes}", "started_at": ago(minutes=minutes)})
    audit.record({"id": "now"})
    assert [r["id"] for r in audit.query()] == ["now", "r1", "r3", "r5"]


def test_filters(audit):
    audit.record({"id": "a", "model": "m1", "status": "ok", "source": "http", "started_at": ago(hours=2)})
    audit.record({"id": "b", "model": "m1", "status": "error", "source": "api", "started_at": ago(hours=1)})
    audit.record({"id": "c", "model": "m2", "status": "ok", "source": "api"})
    ids = lambda **f: [r["id"] for r in audit.query(**f)]  # noqa: E731
    assert ids(model="m1") == ["b", "a"]
    assert ids(status="ok") == ["c", "a"]
    assert ids(source="api") == ["c", "b"]
    assert ids(model="m1", source="api") == ["b"]
    assert ids(since=ago(minutes=90)) == ["c", "b"]
    assert ids(since=datetime.now(timezone.utc) - timedelta(minutes=30)) == ["c"]
    assert ids(limit=2) == ["c", "b"]
    assert ids(limit=None) == ["c", "b", "a"]


def test_injection_in_filters_matches_nothing(audit):
    audit.record({"id": INJECTION, "model": "m", "status": "ok", "source": "api"})
    for name in ("model", "status", "source"):
        assert audit.query(**{name: INJECTION}) == []
    assert audit.stats(model=INJECTION) == audit.stats(source=INJECTION) == []
    with pytest.raises(ValueError, match="ISO-8601"):
        audit.query(since=INJECTION)
    assert audit.query(model="m")[0]["id"] == INJECTION
    assert count(audit.path) == 1


def test_500_records_from_20_threads(audit):
    start = threading.Barrier(20)

    def work(n):
        start.wait()
        for i in range(25):
            audit.record({"id": f"{n}-{i}", "model": "m", "status": "ok"})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(audit.query(limit=None)) == 500
    assert audit.pending == 0


def test_retention_by_max_rows(tmp_path):
    log = AuditLog(tmp_path / "audit.db", log_content=True, max_rows=3)
    for i in range(5):
        log.record({"id": f"r{i}", "started_at": ago(minutes=10 - i)}, {"prompt": "p", "completion": "c"})
    log.close()
    with sqlite3.connect(log.path) as conn:
        assert [r[0] for r in conn.execute("SELECT id FROM requests ORDER BY id")] == ["r2", "r3", "r4"]
        kept = conn.execute("SELECT request_id FROM contents ORDER BY 1").fetchall()
    assert kept == [("r2",), ("r3",), ("r4",)]


def test_retention_by_max_age_days(tmp_path):
    log = AuditLog(tmp_path / "audit.db", max_age_days=1)
    log.record({"id": "old", "started_at": ago(days=2)})
    log.record({"id": "new", "started_at": ago(hours=23)})
    assert [r["id"] for r in log.query()] == ["new"]
    log.close()


def test_retention_is_on_by_default_and_bounds_the_file_by_bytes(tmp_path):
    assert (AuditLog.__init__.__kwdefaults__["max_rows"], AuditLog.__init__.__kwdefaults__["max_bytes"]) == (
        1_000_000, 2**30)
    log = AuditLog(tmp_path / "audit.db", log_content=True, max_bytes=512 * 1024)
    for i in range(120):  # 12 MB of prompts, each row in its own batch
        log.record({"id": f"r{i:03}"}, {"prompt": "x" * 100_000, "completion": "c"})
        log.flush()
    kept = [r["id"] for r in log.query(limit=None)]
    log.close()
    assert 0 < len(kept) < 10 and kept[0] == "r119"  # the newest rows are those kept
    assert os.path.getsize(log.path) < 2 * 512 * 1024  # freed pages are reused: the file stops growing
    with sqlite3.connect(log.path) as conn:
        assert sorted(r[0] for r in conn.execute("SELECT request_id FROM contents")) == sorted(kept)


def test_refused_401s_are_counted_per_client_and_hour_in_one_row(audit):
    refused = {"source": "http", "status": "error", "http_status": 401, "model": "m", "endpoint": "/v1/messages"}
    hour = datetime.now(timezone.utc).replace(minute=30)
    for i in range(20):
        audit.record({**refused, "client": "10.0.0.1", "started_at": hour, "client_request_id": f"c{i}"})
    for when in (hour, hour, hour - timedelta(hours=1)):
        audit.record({**refused, "client": "10.0.0.2", "started_at": when})
    audit.record({"source": "api", "model": "m", "status": "ok"})
    audit.record({**refused, "http_status": 400, "client": "10.0.0.1"})  # other refusals keep a row each
    rows = audit.query(limit=None)
    counts = sorted(((r["client"], r["http_status"], r["count"]) for r in rows), key=str)
    assert counts == [("10.0.0.1", 400, 1), ("10.0.0.1", 401, 20), ("10.0.0.2", 401, 1), ("10.0.0.2", 401, 2),
                      (None, None, 1)]
    first = next(r for r in rows if r["count"] == 20)
    assert first["client_request_id"] == "c0" and first["started_at"] == hour.isoformat(timespec="microseconds")
    [stats] = audit.stats()
    assert (stats["requests"], stats["errors"]) == (25, 24)
    assert audit_module.status_text(first) == "error (20 requests)"


def test_locked_database_reports_error_then_recovers(tmp_path, monkeypatch):
    monkeypatch.setattr(audit_module, "BUSY_TIMEOUT", 0.2)
    log = AuditLog(tmp_path / "audit.db")
    log.record({"id": "before"})
    assert log.flush()
    other = sqlite3.connect(log.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.warns(RuntimeWarning, match="locked"):
        log.record({"id": "during"})
        assert log.flush(timeout=5)
    assert "locked" in log.error
    other.execute("ROLLBACK")
    other.close()
    log.record({"id": "after"})
    assert [r["id"] for r in log.query()] == ["after", "before"]
    assert log.error is None
    log.close()


def test_brief_lock_delays_but_loses_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(audit_module, "BUSY_TIMEOUT", 2.0)
    log = AuditLog(tmp_path / "audit.db")
    other = sqlite3.connect(log.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.2, other.execute, ["ROLLBACK"]).start()
    log.record({"id": "r"})
    assert log.flush(timeout=5)
    assert log.error is None
    assert [r["id"] for r in log.query()] == ["r"]
    other.close()
    log.close()


def test_corrupt_database_warns_once_and_record_does_not_raise(tmp_path):
    path = tmp_path / "audit.db"
    path.write_bytes(bytes(range(256)) * 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = AuditLog(path)
        for _ in range(3):
            log.record({"model": "m"})
        assert log.flush(timeout=5)
    assert len(caught) == 1 and caught[0].category is RuntimeWarning
    assert "not a database" in log.error
    assert log.pending == 0
    with pytest.raises(MLXManagerError, match="cannot be read"):
        log.query()
    log.close()


def test_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.warns(RuntimeWarning, match="not usable"):
        log = AuditLog(blocker / "audit.db")
    log.record({"model": "m"})
    assert log.flush(timeout=5)
    assert log.error
    log.close()


def test_content_not_logged_by_default(audit):
    audit.record({"id": "r"}, {"prompt": [{"role": "user", "content": "secret"}], "completion": "x"})
    audit.flush()
    assert count(audit.path, "contents") == 0


def test_content_logged_when_asked(tmp_path):
    log = AuditLog(tmp_path / "audit.db", log_content=True)
    log.record({"id": "r"}, {"prompt": [{"role": "user", "content": "héllo"}], "completion": "hi"})
    log.close()
    with sqlite3.connect(log.path) as conn:
        row = conn.execute("SELECT request_id, prompt, completion FROM contents").fetchone()
    assert row == ("r", '[{"role": "user", "content": "héllo"}]', "hi")


def test_subscribe_delivers_committed_rows(audit):
    seen = []

    def callback(row):
        # the row is already committed: a fresh connection sees it
        with sqlite3.connect(audit.path) as conn:
            stored = conn.execute("SELECT id FROM requests WHERE id = ?", [row["id"]]).fetchone()
        seen.append((row["id"], stored))

    def broken(row):
        raise RuntimeError("boom")

    audit.subscribe(broken)
    unsubscribe = audit.subscribe(callback)
    audit.record({"id": "a"})
    audit.flush()
    unsubscribe()
    audit.record({"id": "b"})
    audit.flush()
    assert seen == [("a", ("a",))]
    assert len(audit.query()) == 2


def test_stats_on_known_data(audit):
    for i, duration in enumerate([1.0, 2.0, 3.0, 4.0]):
        audit.record(
            {"model": "a", "status": "ok", "duration": duration, "ttft": duration / 10,
             "tokens_per_second": 10.0 * (i + 1)}
        )
    audit.record({"model": "a", "status": "timeout", "duration": 30.0})
    audit.record({"model": "a", "status": "cancelled", "duration": 0.1})
    audit.record({"model": "b", "status": "error", "source": "http"})
    a, b = audit.stats()
    assert a["model"] == "a" and a["requests"] == 6 and a["errors"] == 1
    assert a["error_rate"] == pytest.approx(1 / 6)
    assert a["p50_duration"] == pytest.approx(2.5)
    assert a["p95_duration"] == pytest.approx(3.85)
    assert a["p50_ttft"] == pytest.approx(0.25)
    assert a["mean_tokens_per_second"] == pytest.approx(25.0)
    assert b == {
        "model": "b", "requests": 1, "errors": 1, "error_rate": 1.0, "p50_duration": None,
        "p95_duration": None, "p50_ttft": None, "p95_ttft": None, "mean_tokens_per_second": None,
    }
    assert [s["model"] for s in audit.stats(source="http")] == ["b"]


def test_close_flushes(tmp_path):
    log = AuditLog(tmp_path / "audit.db")
    for i in range(50):
        log.record({"id": str(i)})
    log.close()
    assert count(log.path) == 50
    log.record({"id": "late"})  # dropped, no error
    assert log.pending == 0


def test_memory_database():
    log = AuditLog(":memory:")
    log.record({"model": "m", "status": "ok"})
    assert [r["model"] for r in log.query()] == ["m"]
    log.close()


def test_to_dataframe_without_pandas(audit, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        audit.to_dataframe()


def test_to_dataframe(audit):
    pytest.importorskip("pandas")
    audit.record({"model": "m"})
    frame = audit.to_dataframe(model="m")
    assert list(frame["model"]) == ["m"]


def test_repr(tmp_path):
    log = AuditLog(tmp_path / "audit.db", max_rows=10)
    assert repr(log) == f"AuditLog({str(log.path)!r}, max_rows=10) <pending=0, error=None>"
    log.close()
    assert "closed" in repr(log)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- schema migrations --------------------------------------------------------------------------


def test_database_from_before_migrations_is_upgraded_with_rows_intact(tmp_path):
    path = tmp_path / "audit.db"
    shutil.copy(FIXTURE_V0, path)
    log = AuditLog(path, log_content=True)
    rows = {r["id"]: r for r in log.query()}
    assert set(rows) == {"req_v0ok", "req_v0err", "req_v0api"}
    ok = rows["req_v0ok"]
    assert ok["stream"] is True and ok["user_agent"] == "curl/8" and ok["completion_tokens"] == 7
    assert ok["started_at"] == "2024-05-01T10:00:00.000000+00:00" and ok["client_request_id"] is None
    assert rows["req_v0err"]["error_message"] == "bad"
    log.record({"model": "new", "client_request_id": "c-1"}, {"prompt": "p", "completion": "c"})
    [new] = log.query(client_request_id="c-1")
    assert new["model"] == "new" and new["id"].startswith("req_")
    assert len(log.query(limit=None)) == 4 and log.error is None
    log.close()
    with sqlite3.connect(path) as conn:
        contents = dict(conn.execute("SELECT request_id, completion FROM contents"))
        names = [r[0] for r in conn.execute("SELECT name FROM _audit_migrations ORDER BY rowid")]
    assert contents == {"req_v0ok": "hi v0", new["id"]: "c"}
    assert names == [fn.__name__ for fn in migrations.MIGRATIONS]
    assert names[:2] == ["m001_initial", "add_requests_client_request_id"]


def test_new_database_has_the_columns_and_indexes_the_migrations_declare(audit):
    with sqlite3.connect(audit.path) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(requests)")]
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(requests)")}
    assert columns == list(audit_module.COLUMNS) == list(migrations.COLUMNS)
    assert {"idx_requests_started_at", "idx_requests_client_request_id"} <= indexes


def test_reopening_applies_nothing_twice(tmp_path):
    path = tmp_path / "audit.db"
    AuditLog(path).close()
    before = count(path, "_audit_migrations")
    log = AuditLog(path)
    log.record({"model": "m"})
    log.close()
    assert count(path, "_audit_migrations") == before == len(migrations.MIGRATIONS)


def test_two_logs_opening_a_new_database_at_once_both_work(tmp_path):
    path = tmp_path / "audit.db"
    start = threading.Barrier(4)
    logs = []

    def open_one():
        start.wait()
        logs.append(AuditLog(path))

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for log in logs:
        log.record({"model": "m"})
        log.close()
        assert log.error is None
    assert count(path) == 4
    assert count(path, "_audit_migrations") == len(migrations.MIGRATIONS)


def test_a_failing_migration_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "audit.db"
    shutil.copy(FIXTURE_V0, path)

    def broken(db):
        db["requests"].add_column("half_done", int)
        raise RuntimeError("boom")

    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, broken])
    with pytest.warns(RuntimeWarning, match="boom"):
        log = AuditLog(path)
    log.close()
    with sqlite3.connect(path) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(requests)")]
        assert not conn.execute("SELECT name FROM sqlite_master WHERE name = '_audit_migrations'").fetchall()
    assert "half_done" not in columns and "client_request_id" not in columns
    assert count(path) == 3


def test_query_by_client_request_id(audit):
    audit.record({"id": "a", "client_request_id": "mine"})
    audit.record({"id": "b", "client_request_id": "mine"})
    audit.record({"id": "c", "client_request_id": "theirs"})
    assert [r["id"] for r in audit.query(client_request_id="mine")] == ["b", "a"]
    assert audit.query(client_request_id=INJECTION) == []


# -- ids: generated by the library, never overwritten; a bad row is the only one dropped -------


def test_a_stored_row_is_never_overwritten(audit, caplog):
    audit.record({"id": "victim", "status": "ok", "client_request_id": "victim"})
    audit.flush()
    with caplog.at_level(logging.WARNING, logger=audit_module.__name__):
        audit.record({"id": "victim", "status": "error", "http_status": 401, "client_request_id": "victim"})
        audit.flush()
    rows = {r["id"]: r for r in audit.query(client_request_id="victim")}
    assert len(rows) == 2 and rows["victim"]["status"] == "ok"
    [other] = [r for rid, r in rows.items() if rid != "victim"]
    assert other["status"] == "error" and other["id"].startswith("req_")
    assert "already stored" in caplog.text
    assert audit.error is None


def test_two_rows_with_one_id_in_one_batch_are_both_kept(tmp_path):
    log = AuditLog(tmp_path / "audit.db", log_content=True)
    seen = []
    log.subscribe(lambda row: seen.append(row["id"]))
    log._write([  # the writer thread's batch, written directly so that it is one batch
        (audit_module._normalize({"id": "same", "model": m}), {"request_id": "same", "prompt": m, "completion": m})
        for m in "ab"
    ])
    rows = {r["model"]: r["id"] for r in log.query()}
    assert rows["a"] == "same" and rows["b"] != "same"
    assert sorted(seen) == sorted(rows.values())
    log.close()
    with sqlite3.connect(log.path) as conn:
        contents = dict(conn.execute("SELECT request_id, completion FROM contents"))
    assert contents == {"same": "a", rows["b"]: "b"}


def test_a_row_the_database_refuses_is_the_only_one_dropped(audit, caplog):
    rows = [{"id": f"good-{i}"} for i in range(5)] + [{"id": "too-big", "prompt_tokens": 2**70}]  # > SQLite's int
    with caplog.at_level(logging.WARNING, logger=audit_module.__name__):
        audit._write([(audit_module._normalize(row), None) for row in rows])  # one batch, as the writer would
    assert sorted(r["id"] for r in audit.query()) == [f"good-{i}" for i in range(5)]
    assert "row by row" in caplog.text and "'too-big' dropped" in caplog.text
    assert audit.error is None


# -- every text can be stored ------------------------------------------------------------------


def test_a_bad_row_among_30_concurrent_good_ones_is_stored_sanitized(audit):
    start = threading.Barrier(31)
    bad = {"client_request_id": "bad", "user_agent": "\udcff\udcfe\x00agent", "model": "m" * 3_000_000,
           "error_message": "\ud800" * 2000, "endpoint": "/v1/\udc80"}

    def work(row):
        start.wait()
        audit.record(row)

    threads = [threading.Thread(target=work, args=({"client_request_id": f"good-{i}", "model": "m"},))
               for i in range(30)]
    threads.append(threading.Thread(target=work, args=(bad,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = {r["client_request_id"]: r for r in audit.query(limit=None)}
    assert len(rows) == 31 and audit.error is None
    row = rows["bad"]
    assert row["user_agent"] == "\\udcff\\udcfeagent"
    assert row["model"] == "m" * audit_module.MAX_TEXT_CHARS
    assert len(row["error_message"]) == audit_module.MAX_ERROR_CHARS
    assert row["endpoint"] == "/v1/\\udc80"


def test_content_with_surrogates_is_stored(tmp_path):
    log = AuditLog(tmp_path / "audit.db", log_content=True)
    log.record({"id": "r"}, {"prompt": [{"role": "user", "content": "a\udcffb"}], "completion": "c\ud800"})
    log.close()
    with sqlite3.connect(log.path) as conn:
        prompt, completion = conn.execute("SELECT prompt, completion FROM contents").fetchone()
    assert "a\\udcffb" in prompt and completion == "c\\ud800"


# -- permissions -------------------------------------------------------------------------------


def test_home_folder_is_0700_and_database_files_0600(isolated_home):
    old = os.umask(0)  # the modes must not depend on the umask
    try:
        log = AuditLog()
        log.record({"model": "m"})
        log.flush()
        assert mode(isolated_home) == 0o700
        for suffix in ("", "-wal", "-shm"):
            assert mode(f"{log.path}{suffix}") == 0o600, suffix
        log.close()
    finally:
        os.umask(old)


def test_an_existing_world_readable_database_is_made_private(tmp_path):
    path = tmp_path / "audit.db"
    AuditLog(path).close()
    os.chmod(path, 0o644)
    os.chmod(tmp_path, 0o755)
    log = AuditLog(path)
    log.record({"model": "m"})
    log.flush()
    assert mode(path) == 0o600 and mode(f"{path}-wal") == 0o600
    assert mode(tmp_path) == 0o755  # a folder it did not create keeps its mode
    log.close()


# -- read-only ---------------------------------------------------------------------------------


def test_read_only_database_says_so_with_its_path(tmp_path, monkeypatch):
    # Tests run as root, where chmod does not stop writes: open the database read-only instead.
    path = tmp_path / "audit.db"
    AuditLog(path).close()
    connect = sqlite3.connect
    monkeypatch.setattr(audit_module.sqlite3, "connect",
                        lambda p, **kw: connect(f"file:{p}?mode=ro", uri=True, **kw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = AuditLog(path)
        log.record({"model": "m"})
        log.record({"model": "m"})
        assert log.flush(timeout=5)
    assert log.error.startswith(f"the audit database {path} is read-only")
    assert "readonly database" in log.error
    assert len(caught) == 1 and "read-only" in str(caught[0].message)
    log.close()


def test_read_only_file_system_says_so(tmp_path, monkeypatch):
    path = tmp_path / "audit.db"
    erofs = OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    assert audit_module._describe(erofs, path).startswith(f"the audit database {path} is read-only")
    cannot_open = sqlite3.OperationalError("unable to open database file")
    assert audit_module._describe(cannot_open, path) == "OperationalError: unable to open database file"
    monkeypatch.setattr(audit_module.os, "statvfs", lambda p: os.statvfs_result((0,) * 8 + (os.ST_RDONLY, 255)))
    assert "is read-only" in audit_module._describe(cannot_open, path)
    assert audit_module._describe(sqlite3.OperationalError("database is locked"), ":memory:") == (
        "OperationalError: database is locked"
    )
