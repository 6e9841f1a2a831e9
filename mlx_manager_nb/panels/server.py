"""The server panel: start and stop the HTTP server, its URL, live counters and client snippets."""

from __future__ import annotations

import asyncio
import json
import weakref
from html import escape
from typing import TYPE_CHECKING, Any, Callable

import ipywidgets as widgets

from .common import coalesced, default_audit, default_pool, error_html, make_panel, ready_options, ui_caller

if TYPE_CHECKING:
    from ..audit_log import AuditLog
    from ..model_pool import Pool

# Servers started from a server panel, per pool (with their API key, for the snippets), and the
# server panels to refresh when one starts or stops.
_servers: weakref.WeakKeyDictionary[Pool, tuple[Any, str | None]] = weakref.WeakKeyDictionary()
_server_listeners: list[Callable[[], None]] = []
SETTLE = 0.3  # seconds after a request event to read the server's counters again


def _snippets(url: str, api_key: str | None, model: str) -> dict[str, str]:
    key = api_key or "none"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    hello = '[{"role": "user", "content": "Hello!"}]'
    return {
        "curl": (f"curl {url}/v1/chat/completions \\\n  -H 'Content-Type: application/json' \\\n"
                 f"  -H 'Authorization: Bearer {key}' \\\n  -d '{body}'"),
        "openai": (f"from openai import OpenAI\n\nclient = OpenAI(base_url={json.dumps(url + '/v1')}, "
                   f"api_key={json.dumps(key)})\nreply = client.chat.completions.create(model={json.dumps(model)}, "
                   f"messages={hello})\nprint(reply.choices[0].message.content)"),
        "anthropic": (f"import anthropic\n\nclient = anthropic.Anthropic(base_url={json.dumps(url)}, "
                      f"api_key={json.dumps(key)})\nreply = client.messages.create(model={json.dumps(model)}, "
                      f"max_tokens=256, messages={hello})\nprint(reply.content[0].text)"),
    }


def _notify_servers() -> None:
    for listener in list(_server_listeners):
        listener()


def server_panel(pool: Pool | None = None, audit: AuditLog | None = None) -> widgets.VBox:
    """Start and stop the HTTP server on the pool; its URL, live counters and client snippets."""
    pool = default_pool(pool)
    audit = default_audit(audit, pool)
    call = ui_caller()
    host = widgets.Text(value="127.0.0.1", description="Host")
    port = widgets.BoundedIntText(value=8000, min=0, max=65535, description="Port")
    api_key = widgets.Password(description="API key", placeholder="none")
    toggle = widgets.ToggleButton(description="Start server", icon="play")
    url = widgets.HTML()
    counters = widgets.HTML()
    snippets = widgets.HTML()
    error = widgets.HTML()

    def running() -> tuple[Any, str | None]:
        server, key = _servers.get(pool, (None, None))
        return (server, key) if server is not None and server.running else (None, None)

    def refresh() -> None:
        server, key = running()
        toggle.value = server is not None
        toggle.description, toggle.icon = ("Stop server", "stop") if server else ("Start server", "play")
        host.disabled = port.disabled = api_key.disabled = server is not None
        if server is None:
            url.value = "<i>Server stopped.</i>"
            counters.value = snippets.value = ""
            return
        url.value = f"<a href='{escape(server.url)}' target='_blank'>{escape(server.url)}</a>"
        s = server.stats()
        tps = s.get("tokens_per_second")
        counters.value = (f"requests: <b>{s['requests']}</b> · active streams: <b>{s['active_streams']}</b>"
                          f" · tokens/s: <b>{'–' if tps is None else f'{tps:.1f}'}</b>")
        ready = ready_options(pool)
        texts = _snippets(server.url, key, ready[0][0] if ready else "MODEL")
        snippets.value = "".join(f"<b>{escape(k)}</b><pre style='user-select:all'>{escape(v)}</pre>"
                                 for k, v in texts.items())

    def start() -> None:
        from ..server import serve

        error.value = ""
        try:
            key = api_key.value or None
            _servers[pool] = serve(pool=pool, audit=audit, host=host.value.strip(), port=port.value,
                                   api_key=key), key
        except Exception as e:
            error.value = error_html(e)
        _notify_servers()
        refresh()

    def stop() -> None:
        server, _ = _servers.pop(pool, (None, None))
        if server is None:
            return
        try:
            stopping = server.stop()
        except Exception as e:
            error.value = error_html(e)
            stopping = None
        if isinstance(stopping, asyncio.Future):
            stopping.add_done_callback(lambda _: _notify_servers())
        _notify_servers()
        refresh()

    def on_toggle(change: dict) -> None:
        server, _ = running()
        if change["new"] and server is None:
            start()
        elif not change["new"] and server is not None:
            stop()

    toggle.observe(on_toggle, "value")
    refresh_soon = coalesced(call, refresh)
    settled = coalesced(call, refresh, delay=SETTLE)

    def on_event(event: dict) -> None:
        refresh_soon()
        if event["type"] == "request":
            settled()  # the server updates its counters just after the pool's event

    unsubscribe = pool.subscribe(on_event)
    _server_listeners.append(refresh_soon)
    refresh()
    parts = dict(host=host, port=port, api_key=api_key, toggle=toggle, url=url, counters=counters,
                 snippets=snippets, error=error)
    children = [widgets.HBox([host, port]), widgets.HBox([api_key, toggle]), url, counters, snippets, error]
    return make_panel(children, parts, [unsubscribe, lambda: _server_listeners.remove(refresh_soon)])
