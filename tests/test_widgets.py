"""The notebook panels on the tiny model, driven as a user would: set values, click buttons."""

import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from html import escape, unescape

import pytest
from helpers import free_port, wait_for

from mlx_manager_nb import defaults
from mlx_manager_nb.errors import ModelNotFoundError
from mlx_manager_nb.panels.common import ui_caller
from mlx_manager_nb.server import running_servers
from mlx_manager_nb.widgets import audit_panel, chat_panel, dashboard, pool_panel, server_panel

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def pool(make_pool, audit):
    return make_pool(keep_alive=None, audit=audit)


@pytest.fixture
def loaded(pool, tiny_model_path):
    pool.load(tiny_model_path)
    return pool


def shown(output) -> str:
    """What an Output widget shows, as text: each output's Markdown, HTML or plain text."""
    return "\n".join(next(o["data"][m] for m in ("text/markdown", "text/html", "text/plain") if m in o["data"])
                     for o in output.outputs)


def chat_until_done(parts, text, max_tokens=20):
    parts.prompt.value = text
    parts.temperature.value = 0.0
    parts.max_tokens.value = max_tokens
    parts.send.click()
    assert wait_for(lambda: not parts.send.disabled), parts.error.value


# -- pool ---------------------------------------------------------------------------------------


def test_load_via_the_panel_puts_the_model_in_the_pool_and_the_table(pool, tiny_model_path):
    parts = pool_panel(pool).parts
    assert "No model loaded" in parts.table.value
    assert "demo" in parts.source.options
    parts.source.value = str(tiny_model_path)
    parts.load.click()
    assert wait_for(lambda: pool.is_loaded("tiny-llama"))
    assert wait_for(lambda: "tiny-llama" in parts.table.value and "ready" in parts.table.value)
    assert wait_for(lambda: not parts.load.disabled)
    assert parts.error.value == ""
    assert parts.target.value == "tiny-llama"
    assert parts.memory.value > 0 and " / " in parts.memory_text.value


def test_unload_pin_and_unpin_from_the_panel(loaded):
    parts = pool_panel(loaded).parts
    assert parts.target.value == "tiny-llama"
    parts.pin.click()
    assert wait_for(lambda: loaded.models()[0].pinned and ">yes<" in parts.table.value)
    parts.unpin.click()
    assert wait_for(lambda: not loaded.models()[0].pinned and ">yes<" not in parts.table.value)
    parts.unload.click()
    assert wait_for(lambda: loaded.models() == [] and "No model loaded" in parts.table.value)
    assert parts.target.value is None
    parts.unload.click()
    assert "No model selected" in parts.error.value


def test_a_bad_path_shows_its_error_and_the_panel_still_works(pool, tiny_model_path, tmp_path):
    parts = pool_panel(pool).parts
    parts.source.value = str(tmp_path / "nowhere")
    parts.load.click()
    assert wait_for(lambda: "No such model file or folder" in parts.error.value)
    assert wait_for(lambda: not parts.load.disabled)
    parts.source.value = str(tiny_model_path)
    parts.load.click()
    assert wait_for(lambda: "tiny-llama" in parts.table.value)
    assert parts.error.value == ""


def test_a_closed_panel_stops_following_the_pool(pool, tiny_model_path):
    panel = pool_panel(pool)
    panel.close()
    pool.load(tiny_model_path)
    time.sleep(0.3)
    assert "No model loaded" in panel.parts.table.value


# -- chat ---------------------------------------------------------------------------------------


def test_chat_streams_answers_shows_tokens_per_second_and_clear_empties(loaded, audit):
    parts = chat_panel(loaded).parts
    assert parts.model.value == "tiny-llama"
    chat_until_done(parts, "Hello")
    answer = loaded.chat(HELLO, temperature=0, max_tokens=20).text
    assert [m["role"] for m in parts.history] == ["user", "assistant"]
    assert parts.history[1]["content"] == answer
    (answer_shown,) = [o for o in parts.conversation.outputs if o["data"].get("text/plain") == answer]
    assert answer_shown["data"]["text/markdown"] == answer  # rendered as Markdown, as %%chat renders it
    assert "20 tokens" in parts.speed.value and "tok/s" in parts.speed.value
    chat_until_done(parts, "And then?")
    assert [m["role"] for m in parts.history] == ["user", "assistant"] * 2
    rows = audit.query(source="widget")
    assert len(rows) == 2
    assert {(r["endpoint"], r["protocol"], r["stream"], r["status"]) for r in rows} == {
        ("chat_panel", "python", True, "ok")}
    parts.clear.click()
    assert parts.history == [] and "No messages yet" in shown(parts.conversation) and parts.speed.value == ""


def test_stop_cancels_a_long_answer_in_the_engine(loaded, audit):
    parts = chat_panel(loaded).parts
    parts.prompt.value = "Tell me a long story"
    parts.max_tokens.value = 400
    parts.temperature.value = 0.0  # greedy: the tiny model never samples its end-of-turn early
    parts.send.click()
    assert not parts.stop.disabled
    started = shown(parts.conversation)
    assert wait_for(lambda: shown(parts.conversation) != started)  # the answer is streaming in
    parts.stop.click()
    assert wait_for(lambda: not parts.send.disabled)
    assert wait_for(lambda: loaded.models()[0].in_flight == 0)
    assert parts.stop.disabled and "▌" not in shown(parts.conversation)
    audit.flush()
    (row,) = audit.query(source="widget")
    assert row["status"] == "cancelled" and row["completion_tokens"] < 400
    tokens, rate, reason = parts.speed.value.split(" · ")  # like a finished answer's: "12 tokens · 30.1 tok/s"
    assert reason == "stopped" and rate.endswith("tok/s")
    assert 0 < int(tokens.removesuffix(" tokens")) <= row["completion_tokens"]


def test_a_chat_error_shows_in_the_panel_and_the_panel_still_works(loaded):
    parts = chat_panel(loaded).parts
    parts.prompt.value = "Hello"
    parts.max_tokens.value = 100_000  # past the tiny model's context
    parts.send.click()
    assert "exceeds" in parts.error.value and parts.history == [] and parts.prompt.value == "Hello"
    chat_until_done(parts, "Hello")
    assert len(parts.history) == 2 and parts.error.value == ""


def test_tool_calls_run_and_show_readably_in_the_chat_panel(pool, wide_tiny_model_path):
    from typing import Literal

    def dice(n: Literal[1, 2]) -> int:
        """Roll n dice."""
        return 7

    pool.load(wide_tiny_model_path)
    parts = chat_panel(pool, tools=[dice], tool_choice="required").parts
    chat_until_done(parts, "Roll!", max_tokens=80)
    roles = [m["role"] for m in parts.history]
    assert roles[:3] == ["user", "assistant", "tool"] and roles[-1] == "assistant", parts.error.value
    text = shown(parts.conversation)
    assert "→ dice(n=" in text and "← dice: 7" in text


# -- audit --------------------------------------------------------------------------------------


def test_audit_panel_shows_new_rows_live_and_filters_them(loaded):
    parts = audit_panel(loaded.audit).parts
    assert "No requests yet" in parts.summary.value
    loaded.chat(HELLO, max_tokens=5, meta={"source": "widget", "endpoint": "chat_panel"})
    loaded.chat(HELLO, max_tokens=5)
    with pytest.raises(ModelNotFoundError):
        loaded.chat(HELLO, model="missing")
    assert wait_for(lambda: parts.rows.value.count("<tr>") == 4)  # a header and three rows
    assert "chat_panel" in parts.rows.value and "missing" in parts.summary.value
    assert set(parts.model.options) == {"(all)", "tiny-llama", "missing"}
    parts.status.value = "error"
    assert parts.rows.value.count("<tr>") == 2 and "missing" in parts.rows.value
    parts.status.value = "(all)"
    parts.source.value = "widget"
    assert parts.rows.value.count("<tr>") == 2 and "chat_panel" in parts.rows.value
    parts.source.value = "(all)"
    parts.model.value = "tiny-llama"
    assert parts.rows.value.count("<tr>") == 3 and "missing" not in parts.summary.value
    assert "0%" in parts.summary.value


def test_audit_rows_show_their_date_when_they_span_days(audit):
    parts = audit_panel(audit).parts
    assert (parts.model.value, parts.status.value, parts.source.value) == ("(all)",) * 3
    today = datetime.now(timezone.utc)
    audit.record({"started_at": today, "model": "m", "status": "ok", "source": "http"})
    audit.flush()
    assert wait_for(lambda: parts.rows.value.count("<tr>") == 2)
    clock = today.astimezone().strftime("%H:%M:%S")
    assert f">{clock}<" in parts.rows.value  # one day: the time alone
    audit.record({"started_at": today - timedelta(days=2), "model": "m", "status": "ok", "source": "http"})
    audit.flush()
    assert wait_for(lambda: parts.rows.value.count("<tr>") == 3)
    assert f">{today.astimezone():%Y-%m-%d} {clock}<" in parts.rows.value
    assert f">{(today - timedelta(days=2)).astimezone():%Y-%m-%d} " in parts.rows.value


# -- together -----------------------------------------------------------------------------------


def test_two_dashboards_stay_in_step(pool, audit, tiny_model_path):
    one, two = dashboard(pool, audit), dashboard(pool, audit)
    assert one.titles == ("Pool", "Chat", "Server", "Audit")
    first, second = (d.children[0].parts for d in (one, two))
    first.source.value = str(tiny_model_path)
    first.load.click()
    assert wait_for(lambda: all("tiny-llama" in p.table.value for p in (first, second)))
    assert wait_for(lambda: two.children[1].parts.model.value == "tiny-llama")
    chat_until_done(one.children[1].parts, "Hello")
    assert wait_for(lambda: all("chat_panel" in d.children[3].parts.rows.value for d in (one, two)))
    second.target.value = "tiny-llama"
    second.pin.click()
    assert wait_for(lambda: all(">yes<" in p.table.value for p in (first, second)))


def test_dashboard_defaults_to_the_package_pool_and_audit(pool, audit, monkeypatch, tiny_model_path):
    monkeypatch.setattr(defaults, "_pool", pool)
    monkeypatch.setattr(defaults, "_audit", audit)
    tab = dashboard()
    pool.load(tiny_model_path)
    assert wait_for(lambda: "tiny-llama" in tab.children[0].parts.table.value)


def test_ui_caller_hops_onto_the_loop_running_when_built():
    ran_on = []
    call = ui_caller()  # no running loop: runs at once, where called
    caller = threading.Thread(target=call, args=(lambda: ran_on.append(threading.get_ident()),))
    caller.start()
    caller.join()
    assert ran_on == [caller.ident]  # on the calling thread, not this one
    assert caller.ident != threading.get_ident()

    async def main():
        call = ui_caller()
        done = asyncio.Event()
        thread = threading.Thread(target=call, args=(lambda: (ran_on.append(threading.get_ident()), done.set()),))
        thread.start()
        await asyncio.wait_for(done.wait(), 5)
        thread.join()
        return thread.ident

    worker = asyncio.run(main())
    assert len(ran_on) == 2
    assert ran_on[1] == threading.get_ident() != worker  # hopped onto the loop's thread


def test_ui_caller_keeps_the_order_of_calls_from_other_threads_and_its_own():
    async def main():
        call, order = ui_caller(), []
        thread = threading.Thread(target=call, args=(order.append, "progress 90% (engine thread)"))
        thread.start()
        thread.join()
        call(order.append, "ready (loop thread)")  # waits behind the queued call instead of overtaking it
        await asyncio.sleep(0.05)
        call(order.append, "later (loop thread, nothing queued)")
        return order

    assert asyncio.run(main()) == ["progress 90% (engine thread)", "ready (loop thread)",
                                   "later (loop thread, nothing queued)"]


def test_in_a_running_loop_widgets_change_on_the_loop_thread_only(loaded):
    async def main():
        panel = pool_panel(loaded)
        threads = set()
        panel.parts.table.observe(lambda _: threads.add(threading.get_ident()), "value")
        loaded.pin("tiny-llama")  # events from this thread and the engine thread
        await asyncio.to_thread(loaded.unpin, "tiny-llama")
        for _ in range(100):
            await asyncio.sleep(0.01)
            if ">yes<" not in panel.parts.table.value and threads:
                break
        return threads

    assert asyncio.run(main()) == {threading.get_ident()}


# -- server -------------------------------------------------------------------------------------


def test_server_panel_starts_and_stops_the_server_with_snippets(loaded, audit, monkeypatch):
    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX", raising=False)
    parts, other = (server_panel(loaded, audit).parts for _ in range(2))
    parts.port.value = free_port()
    parts.api_key.value = "sekret"
    parts.toggle.value = True
    assert parts.error.value == ""
    url = f"http://127.0.0.1:{parts.port.value}"
    assert wait_for(lambda: url in parts.url.value and url in other.url.value)  # two dashboards agree
    assert f"OpenAI: <code>{url}/v1</code>" in parts.url.value and f"Anthropic: <code>{url}</code>" in parts.url.value
    assert "Through Jupyter" not in parts.url.value  # not on a hub
    assert parts.toggle.description == "Stop server" and other.toggle.value and other.port.disabled
    for name in ("curl", "openai", "anthropic"):
        assert escape(name) in parts.snippets.value
    assert parts.snippets.value.count(url) == 3 and "Bearer sekret" in parts.snippets.value
    assert parts.snippets.value.count(">Copy</button>") == 3
    assert "white-space:pre;overflow-x:auto" in parts.snippets.value  # code scrolls, never wraps mid-word
    assert "requests: <b>0</b>" in parts.counters.value
    body = json.dumps({"model": "tiny-llama", "messages": HELLO, "max_tokens": 5}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, {
        "Content-Type": "application/json", "Authorization": "Bearer sekret"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    counted = ("requests: <b>1</b>", "active streams: <b>0</b>")
    assert wait_for(lambda: all(c in parts.counters.value and c in other.counters.value for c in counted))
    other.toggle.value = False
    assert wait_for(lambda: "Server stopped" in parts.url.value)
    assert parts.toggle.description == "Start server" and not parts.toggle.value and parts.snippets.value == ""


def snippet(html: str, name: str, nth: int = 0) -> str:
    """The code of the ``nth`` snippet called ``name`` in the panel's HTML, as the Copy button copies it."""
    codes = re.findall(rf"<b>{name}</b> <button.*?<pre[^>]*>(.*?)</pre>", html, re.S)
    return unescape(codes[nth])


def test_the_snippets_work_as_shown_without_a_key(loaded, audit, monkeypatch):
    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX", raising=False)
    parts = server_panel(loaded, audit).parts
    parts.port.value = free_port()
    parts.toggle.value = True
    assert wait_for(lambda: "OpenAI" in parts.url.value)
    assert "none" not in parts.snippets.value and "Authorization" not in parts.snippets.value
    code = snippet(parts.snippets.value, "openai")
    assert 'api_key="unused"' in code
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0 and printed.stdout.strip(), printed.stderr
    curl = snippet(parts.snippets.value, "curl")
    assert "'Hello!'" not in curl and '"Hello!"' in curl  # one unbroken line per argument
    parts.toggle.value = False
    assert wait_for(lambda: "Server stopped" in parts.url.value)


def test_on_a_hub_the_panel_shows_the_proxied_url_and_how_to_authenticate(loaded, audit, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ana/")
    monkeypatch.setenv("JUPYTERHUB_PUBLIC_URL", "https://hub.example.org/user/ana/")
    parts = server_panel(loaded, audit).parts
    parts.port.value = port = free_port()
    parts.toggle.value = True
    proxied = f"https://hub.example.org/user/ana/proxy/{port}"
    assert wait_for(lambda: proxied in parts.url.value)
    assert f"OpenAI: <code>{proxied}/v1</code>" in parts.url.value and "hub/token" in parts.url.value
    assert f"http://127.0.0.1:{port}/v1" in parts.url.value  # the local one too
    code = snippet(parts.snippets.value, "openai", 1)
    assert f'base_url="{proxied}/v1"' in code and '"Authorization": "token <JUPYTER_TOKEN>"' in code
    parts.toggle.value = False
    assert wait_for(lambda: "Server stopped" in parts.url.value)


def test_a_busy_port_shows_its_error_and_the_server_panel_still_works(loaded, audit):
    parts = server_panel(loaded, audit).parts
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        parts.port.value = busy.getsockname()[1]
        parts.toggle.value = True
        assert parts.error.value and not parts.toggle.value
    parts.port.value = free_port()
    parts.toggle.value = True
    assert wait_for(lambda: parts.toggle.value and parts.error.value == "")
    parts.toggle.value = False
    assert wait_for(lambda: "Server stopped" in parts.url.value)


def test_in_a_running_loop_the_server_panel_serves_on_that_loop(loaded, audit):
    async def main():
        parts = server_panel(loaded, audit).parts
        parts.port.value = free_port()
        parts.toggle.value = True
        assert parts.error.value == "" and parts.toggle.description == "Stop server"
        assert [s.mode for s in running_servers()] == ["kernel"]
        await asyncio.sleep(0.05)
        parts.toggle.value = False  # stop() returns a task on this loop
        for _ in range(100):
            await asyncio.sleep(0.01)
            if "Server stopped" in parts.url.value:
                break
        return parts

    parts = asyncio.run(main())
    assert "Server stopped" in parts.url.value and running_servers() == []
