"""The server panel: start and stop the HTTP server, its URL, live counters and client snippets."""

from __future__ import annotations

import json
from html import escape
from typing import TYPE_CHECKING

import ipywidgets as widgets

from ..model_pool import PoolEvent, RequestEvent
from ..server import Server, on_servers_changed, running_servers, serve
from .common import audit_or_default, coalesced, error_html, make_panel, pool_or_default, ready_options, ui_caller

if TYPE_CHECKING:
    from ..audit_log import AuditLog
    from ..model_pool import Pool

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


def server_panel(pool: Pool | None = None, audit: AuditLog | None = None) -> widgets.VBox:
    """Start and stop the HTTP server on the pool; its URL, live counters and client snippets."""
    pool = pool_or_default(pool)
    audit = audit_or_default(audit, pool)
    call = ui_caller()
    host = widgets.Text(value="127.0.0.1", description="Host")
    port = widgets.BoundedIntText(value=8000, min=0, max=65535, description="Port")
    api_key = widgets.Password(description="API key", placeholder="none")
    toggle = widgets.ToggleButton(description="Start server", icon="play")
    url = widgets.HTML()
    counters = widgets.HTML()
    snippets = widgets.HTML()
    error = widgets.HTML()

    def running() -> Server | None:
        """This pool's server, wherever it was started (a panel, ``%mlx serve``, ``serve()``)."""
        servers = running_servers(pool)
        return servers[0] if servers else None

    def refresh() -> None:
        server = running()
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
        texts = _snippets(server.url, server.api_key, ready[0][0] if ready else "MODEL")
        snippets.value = "".join(f"<b>{escape(k)}</b><pre style='user-select:all'>{escape(v)}</pre>"
                                 for k, v in texts.items())

    def start() -> None:
        error.value = ""
        try:
            serve(pool=pool, audit=audit, host=host.value.strip(), port=port.value, api_key=api_key.value or None)
        except Exception as e:
            error.value = error_html(e)
        refresh()

    def stop() -> None:
        server = running()
        if server is None:
            return
        try:
            server.stop()
        except Exception as e:
            error.value = error_html(e)
        refresh()

    def on_toggle(change: dict) -> None:
        server = running()
        if change["new"] and server is None:
            start()
        elif not change["new"] and server is not None:
            stop()

    toggle.observe(on_toggle, "value")
    refresh_soon = coalesced(call, refresh)
    settled = coalesced(call, refresh, delay=SETTLE)

    def on_event(event: PoolEvent) -> None:
        refresh_soon()
        if isinstance(event, RequestEvent):
            settled()  # the server updates its counters just after the pool's event

    unsubscribe = pool.subscribe(on_event)
    unsubscribe_servers = on_servers_changed(refresh_soon)
    refresh()
    parts = dict(host=host, port=port, api_key=api_key, toggle=toggle, url=url, counters=counters,
                 snippets=snippets, error=error)
    children = [widgets.HBox([host, port]), widgets.HBox([api_key, toggle]), url, counters, snippets, error]
    return make_panel(children, parts, [unsubscribe, unsubscribe_servers])
