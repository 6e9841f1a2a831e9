import sqlite3
import sys
import threading
import warnings
from datetime import datetime, timedelta, timezone

import pytest

from mlx_manager_nb import audit_log as audit_module
from mlx_manager_nb.audit_log import AuditLog, new_request_id, utc_now
from mlx_manager_nb.errors import MLXManagerError

INJECTION = "x' OR 1=1 --"


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
