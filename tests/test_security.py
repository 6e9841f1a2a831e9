"""What a hostile client or web page may do to the server, and the audit trail it leaves."""

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from aiohttp import web
from helpers import call, free_port, raw_http, wait_for

from mlx_manager_nb import store
from mlx_manager_nb.audit_log import AuditLog
from mlx_manager_nb.errors import ServerError
from mlx_manager_nb.server import serve

pytestmark = pytest.mark.usefixtures("ctrl_c_works")  # the command-line servers here stop on Ctrl-C

HI = [{"role": "user", "content": "Hi"}]


def chat(model="tiny", **extra):
    return {"model": model, "messages": HI, "max_tokens": 3, **extra}


# -- what an HTTP client may name ------------------------------------------------------------------


def test_a_folder_path_is_never_loaded(server, pool, tiny_model_path, tmp_path):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_path, other)
    status, _, body = call(server.url + "/v1/chat/completions", chat(str(other)))
    assert status == 404 and body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert [m.name for m in pool.models()] == ["tiny-llama"]


def test_a_gguf_path_is_never_imported(server, tiny_model_path, tmp_path):
    from gguf_writer import write_tiny_gguf

    gguf = write_tiny_gguf(tiny_model_path, tmp_path / "evil.gguf")
    status, _, _body = call(server.url + "/v1/chat/completions", chat(str(gguf)))
    assert status == 404
    assert not store.models_dir().exists() or not any(store.models_dir().iterdir())


def test_paths_get_the_same_answer_whether_or_not_they_exist(server):
    answers = []
    for name in ("/etc/passwd", "/etc", "/no/such/dir"):
        status, _, body = call(server.url + "/v1/chat/completions", chat(name))
        assert status == 404
        answers.append(body["error"]["message"].replace(name, "NAME"))
    assert answers[0] == answers[1] == answers[2]
    assert "tiny" in answers[0]  # it lists what can be served


def test_an_unknown_name_lists_what_can_be_served_in_both_protocols(server):
    status, _, body = call(server.url + "/v1/messages", chat("gpt-17"), {"anthropic-version": "2023-06-01"})
    assert status == 404 and body["error"]["type"] == "not_found_error" and "tiny" in body["error"]["message"]


def test_demo_is_not_fetched_without_allow_downloads(server, isolated_home):
    status, _, _ = call(server.url + "/v1/chat/completions", chat("demo"))
    assert status == 404
    assert not (isolated_home / "downloads").exists() and not store.models_dir().exists()


class HubStandIn:
    """A local server at HF_ENDPOINT that records every request it gets."""

    def __init__(self):
        self.requests: list[str] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.record)
        self.runner = web.AppRunner(app)

    async def record(self, request):
        self.requests.append(request.path)
        return web.Response(status=404)


@pytest.fixture
def hub():
    import asyncio

    stand_in = HubStandIn()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    asyncio.run_coroutine_threadsafe(stand_in.runner.setup(), loop).result()
    asyncio.run_coroutine_threadsafe(web.SockSite(stand_in.runner, sock).start(), loop).result()
    stand_in.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield stand_in
    asyncio.run_coroutine_threadsafe(stand_in.runner.cleanup(), loop).result()
    loop.call_soon_threadsafe(loop.stop)


def cli(tiny_model_path, home, *flags, env=None):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_manager_nb", "serve", "--model", str(tiny_model_path), "--port", str(port),
         *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "MLX_NB_HOME": str(home), "PYTHONUNBUFFERED": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return urllib.request.urlopen(url + "/health", timeout=2).status == 200
        except OSError:
            return False

    assert wait_for(healthy, timeout=60), proc.stdout.read() if proc.poll() is not None else "no answer"
    return proc, url



def stop(proc, sig=signal.SIGINT):
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()  # a server that did not stop must not outlive the test
        raise
    return out


def test_a_repo_id_never_reaches_the_hub_unless_downloads_are_allowed(tiny_model_path, tmp_path, hub):
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hf")}
    proc, url = cli(tiny_model_path, tmp_path / "home", env=env)
    try:
        status, _, _ = call(url + "/v1/chat/completions", chat("some-org/some-model"))
    finally:
        stop(proc)
    assert status == 404 and hub.requests == []
    proc, url = cli(tiny_model_path, tmp_path / "home", "--allow-downloads", env=env)
    try:
        status, _, _ = call(url + "/v1/chat/completions", chat("some-org/some-model"))
    finally:
        stop(proc)
    assert status == 404 and hub.requests  # the opt-in does reach the hub (which has nothing)


# -- what a web page may do -----------------------------------------------------------------------


def test_a_cross_site_text_plain_post_is_refused_and_runs_nothing(server, audit):
    status, _, body = call(server.url + "/v1/chat/completions", chat(), {"content-type": "text/plain"})
    assert status == 415 and "application/json" in body["error"]["message"]
    status, _, body = call(server.url + "/v1/messages", raw=b"model=tiny", headers={
        "content-type": "application/x-www-form-urlencoded", "anthropic-version": "2023-06-01"})
    assert status == 415 and body["type"] == "error"
    assert [r["status"] for r in audit.query()] == ["error", "error"]


def test_a_rebinding_host_is_refused(server):
    port = server.port
    for host, expected in ((b"attacker.example", 403), (b"attacker.example:%d" % port, 403),
                           (b"127.0.0.1:%d" % port, 200), (b"localhost:%d" % port, 200), (b"[::1]", 200)):
        status, body = raw_http(port, b"GET /v1/models HTTP/1.1\r\nhost: " + host + b"\r\n")
        assert status == expected, host
    status, body = raw_http(port, b"POST /v1/messages HTTP/1.1\r\nhost: evil.example\r\n"
                                  b"content-type: application/json\r\n", json.dumps(chat()).encode())
    assert status == 403 and json.loads(body)["error"]["type"] == "permission_error"


def test_allowed_hosts_are_accepted(pool):
    server = serve(pool, port=0, mode="thread", allowed_hosts=["notebook.internal"])
    try:
        status, _ = raw_http(server.port, b"GET /health HTTP/1.1\r\nhost: notebook.internal:80\r\n")
        assert status == 200
        status, _ = raw_http(server.port, b"GET /health HTTP/1.1\r\nhost: other.internal\r\n")
        assert status == 403
    finally:
        server.stop(drain=0)


def test_cors_stays_off_unless_listed(server):
    request = urllib.request.Request(server.url + "/v1/models", headers={"origin": "https://evil.example"})
    with urllib.request.urlopen(request) as r:
        assert "access-control-allow-origin" not in {k.lower() for k in r.headers}


# -- keys ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_api_key_is_refused(pool, key):
    with pytest.raises(ServerError, match="api_key is empty"):
        serve(pool, port=0, mode="thread", api_key=key)


def test_the_cli_reads_its_key_from_the_environment(tiny_model_path, tmp_path):
    proc, url = cli(tiny_model_path, tmp_path / "home", env={"MLX_NB_API_KEY": "s3cret"})
    try:
        assert call(url + "/v1/chat/completions", chat("tiny-llama"))[0] == 401
        assert call(url + "/v1/chat/completions", chat("tiny-llama"), {"authorization": "Bearer s3cret"})[0] == 200
    finally:
        out = stop(proc)
    assert "s3cret" not in out
    assert f"base_url={url}/v1" in out and f"base_url={url}\n" in out  # the OpenAI and the Anthropic SDK's


def test_a_header_byte_that_is_not_utf8_is_a_401_not_a_crash(pool):
    server = serve(pool, port=0, mode="thread", api_key="k")
    try:
        status, body = raw_http(server.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                                             b"content-type: application/json\r\nx-api-key: \xff\xfe\r\n",
                                json.dumps(chat()).encode())
        assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    finally:
        server.stop(drain=0)


# -- the audit trail -------------------------------------------------------------------------------


def test_a_client_cannot_forge_or_overwrite_a_row(pool, audit):
    server = serve(pool, port=0, mode="thread", api_key="k")
    try:
        good = {"authorization": "Bearer k", "x-request-id": "victim-1"}
        assert call(server.url + "/v1/chat/completions", chat(), good)[0] == 200
        assert call(server.url + "/v1/chat/completions", chat(), {"x-request-id": "victim-1"})[0] == 401
        assert call(server.url + "/v1/chat/completions", chat(), good)[0] == 200
    finally:
        server.stop(drain=0)
    rows = audit.query(client_request_id="victim-1")
    assert sorted(r["status"] for r in rows) == ["error", "ok", "ok"] and len({r["id"] for r in rows}) == 3


def test_a_bad_header_value_drops_no_row_under_concurrent_requests(pool, audit):
    server = serve(pool, port=0, mode="thread", max_client_requests=31)  # one client, 31 at once
    results = []

    def good():
        results.append(call(server.url + "/v1/chat/completions", chat())[0])

    threads = [threading.Thread(target=good) for _ in range(30)]
    for t in threads:
        t.start()
    status, _ = raw_http(server.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                                      b"content-type: application/json\r\nuser-agent: \xff\xfebad\r\n",
                         json.dumps(chat()).encode())
    for t in threads:
        t.join()
    server.stop(drain=0)
    assert status == 200 and results == [200] * 30
    rows = audit.query(limit=None)
    assert len(rows) == 31 and all(r["status"] == "ok" for r in rows)


def test_content_never_reaches_the_log_through_an_error(server, audit):
    secret = "my-credit-card-4111111111111111"
    status, _, _body = call(server.url + "/v1/chat/completions",
                           {"model": "tiny", "messages": [{"role": "usr", "content": secret}]})
    assert status == 400
    audit.close()
    assert secret.encode() not in b"".join(p.read_bytes() for p in Path(audit.path).parent.glob("audit.db*"))


def test_the_home_and_the_database_are_private(tmp_path, monkeypatch):
    home = tmp_path / "private-home"
    monkeypatch.setenv("MLX_NB_HOME", str(home))
    log = AuditLog()
    log.record({"model": "x", "status": "ok"})
    log.flush()
    assert home.stat().st_mode & 0o777 == 0o700
    for f in home.glob("audit.db*"):
        assert f.stat().st_mode & 0o777 == 0o600, f
    log.close()


# -- nothing lost at shutdown ----------------------------------------------------------------------


def flood(url, n, max_tokens):
    """Start n requests (half streamed) on threads; return the threads."""
    def one(i):
        body = chat("tiny-llama", max_tokens=max_tokens, temperature=0, stream=bool(i % 2))
        try:
            request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                             {"content-type": "application/json"})
            urllib.request.urlopen(request, timeout=120).read()
        except OSError:
            pass  # cut by the shutdown

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stopping_the_cli_under_load_leaves_one_row_per_request(tiny_model_path, tmp_path, sig):
    home = tmp_path / "home"
    proc, url = cli(tiny_model_path, home, "--drain", "1", "--max-client-requests", "60")  # one client, 60 at once
    flood(url, 60, max_tokens=400)
    # all 60 reached the server (on a busy machine the last ones may take a while to connect)
    assert wait_for(lambda: json.load(urllib.request.urlopen(url + "/health"))["server"]["requests"] == 60,
                    timeout=60)
    out = stop(proc, sig)
    assert proc.returncode == 0, out
    with sqlite3.connect(home / "audit.db") as db:
        rows = db.execute("SELECT status, error_message FROM requests").fetchall()
    assert len(rows) == 60, out
    statuses = {s for s, _ in rows}
    assert statuses <= {"ok", "cancelled"} and "cancelled" in statuses, rows[:5]


def test_exiting_python_with_a_thread_server_running_is_clean(tiny_model_path, tmp_path):
    script = f"""
import json, threading, time, urllib.request
from mlx_manager_nb import Pool, AuditLog, serve
pool = Pool(keep_alive=None, audit=AuditLog())
pool.load({str(tiny_model_path)!r})
server = serve(pool, port=0, mode="thread")
def one():
    body = json.dumps({{"model": "tiny-llama", "max_tokens": 400, "temperature": 0,
                       "messages": [{{"role": "user", "content": "Hi"}}]}}).encode()
    try:
        urllib.request.urlopen(urllib.request.Request(server.url + "/v1/chat/completions", body,
                               {{"content-type": "application/json"}}), timeout=60).read()
    except OSError:
        pass
for _ in range(4):
    threading.Thread(target=one, daemon=True).start()
while pool.models()[0].in_flight < 4:
    time.sleep(0.01)
"""
    home = tmp_path / "home"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MLX_NB_HOME": str(home)})
    assert done.returncode == 0 and "Error" not in done.stderr, done.stderr
    with sqlite3.connect(home / "audit.db") as db:
        statuses = [s for (s,) in db.execute("SELECT status FROM requests")]
    assert len(statuses) == 4 and set(statuses) <= {"ok", "cancelled"}, statuses
