"""The notebook panels on the tiny model, driven as a user would: set values, click buttons."""

import asyncio
import json
import socket
import threading
import time
import urllib.request
from html import escape

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
    assert escape(answer) in parts.conversation.value
    assert "20 tokens" in parts.speed.value and "tok/s" in parts.speed.value
    chat_until_done(parts, "And then?")
    assert [m["role"] for m in parts.history] == ["user", "assistant"] * 2
    rows = audit.query(source="widget")
    assert len(rows) == 2
    assert {(r["endpoint"], r["protocol"], r["stream"], r["status"]) for r in rows} == {
        ("chat_panel", "python", True, "ok")}
    parts.clear.click()
    assert parts.history == [] and "No messages yet" in parts.conversation.value and parts.speed.value == ""


def test_stop_cancels_a_long_answer_in_the_engine(loaded, audit):
    parts = chat_panel(loaded).parts
    parts.prompt.value = "Tell me a long story"
    parts.max_tokens.value = 400
    parts.temperature.value = 0.0  # greedy: the tiny model never samples its end-of-turn early
    parts.send.click()
    assert not parts.stop.disabled
    started = parts.conversation.value
    assert wait_for(lambda: parts.conversation.value != started)  # the answer is streaming in
    parts.stop.click()
    assert wait_for(lambda: not parts.send.disabled)
    assert wait_for(lambda: loaded.models()[0].in_flight == 0)
    assert parts.speed.value == "stopped" and parts.stop.disabled
    (row,) = audit.query(source="widget")
    assert row["status"] == "cancelled" and row["completion_tokens"] < 400


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
    assert "→ dice(n=" in parts.conversation.value and "← dice: 7" in parts.conversation.value


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


def test_server_panel_starts_and_stops_the_server_with_snippets(loaded, audit):
    parts, other = (server_panel(loaded, audit).parts for _ in range(2))
    parts.port.value = free_port()
    parts.api_key.value = "sekret"
    parts.toggle.value = True
    assert parts.error.value == ""
    url = f"http://127.0.0.1:{parts.port.value}"
    assert wait_for(lambda: url in parts.url.value and url in other.url.value)  # two dashboards agree
    assert parts.toggle.description == "Stop server" and other.toggle.value and other.port.disabled
    for name in ("curl", "openai", "anthropic"):
        assert escape(name) in parts.snippets.value
    assert parts.snippets.value.count(url) == 3 and "sekret" in parts.snippets.value
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
