"""The server panel: start and stop the HTTP server, its URL, live counters and client snippets."""

from __future__ import annotations

import json
from html import escape
from types import SimpleNamespace
from typing import TYPE_CHECKING

import ipywidgets as widgets

from ..hosted import TOKEN_PLACEHOLDER
from ..model_pool import PoolEvent, RequestEvent
from ..server import Server, on_servers_changed, running_servers, serve
from .common import audit_or_default, coalesced, error_html, make_panel, pool_or_default, ready_options, ui_caller

if TYPE_CHECKING:
    from ..audit_log import AuditLog
    from ..model_pool import Pool

SETTLE = 0.3  # seconds after a request event to read the server's counters again
NO_KEY = "unused"  # what the SDKs need as a key when the server wants none (they refuse an empty one)
SNIPPET = ("<div class='mlx-snippet' style='margin:6px 0'><b>{name}</b> <button class='mlx-copy' "
           "onclick=\"navigator.clipboard.writeText(this.closest('.mlx-snippet').querySelector('pre').innerText)"
           ".then(() => this.textContent = 'Copied')\">Copy</button>"
           "<pre style='white-space:pre;overflow-x:auto;margin:2px 0;padding:6px;background:#f5f5f5'>"
           "{code}</pre></div>")


def _snippets(root: str, api_key: str | None, model: str, jupyter: bool = False) -> dict[str, str]:
    """curl, openai and anthropic calls of the server at ``root``; ``jupyter``: through the Jupyter server."""
    key = api_key or NO_KEY
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    hello = '[{"role": "user", "content": "Hello!"}]'
    headers: dict[str, str] = {}
    if jupyter:  # the Jupyter server takes the Authorization header; the key travels as x-api-key
        headers["Authorization"] = f"token {TOKEN_PLACEHOLDER}"
        if api_key:
            headers["x-api-key"] = api_key
    elif api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    curl_headers = "".join(f"  -H '{k}: {v}' \\\n" for k, v in headers.items())
    extra = f", default_headers={json.dumps(headers)}" if jupyter else ""
    anthropic_extra = f", default_headers={json.dumps({'Authorization': headers['Authorization']})}" if jupyter else ""
    return {
        "curl": (f"curl {root}/v1/chat/completions \\\n  -H 'Content-Type: application/json' \\\n"
                 f"{curl_headers}  -d '{body}'"),
        "openai": (f"from openai import OpenAI\n\nclient = OpenAI(base_url={json.dumps(root + '/v1')}, "
                   f"api_key={json.dumps(key)}{extra})\nreply = client.chat.completions.create("
                   f"model={json.dumps(model)}, messages={hello})\nprint(reply.choices[0].message.content)"),
        "anthropic": (f"import anthropic\n\nclient = anthropic.Anthropic(base_url={json.dumps(root)}, "
                      f"api_key={json.dumps(key)}{anthropic_extra})\nreply = client.messages.create("
                      f"model={json.dumps(model)}, max_tokens=256, messages={hello})\nprint(reply.content[0].text)"),
    }


def _snippets_html(texts: dict[str, str]) -> str:
    return "".join(SNIPPET.format(name=escape(k), code=escape(v)) for k, v in texts.items())


def _urls_html(server: Server) -> str:
    """The base URL of each SDK, locally and, on a hub, through the Jupyter server, with how to authenticate."""

    def line(label: str, root: str) -> str:
        bases = " · ".join(f"{sdk}: <code>{escape(url)}</code>" for sdk, url in server.base_urls(root).items())
        health = f"<a href='{escape(root)}/health' target='_blank'>health</a>"
        return f"<div>{label}: {bases} · {health}</div>"

    html = line("This machine", server.url)
    proxied = server.proxied
    if proxied is not None:
        where = "" if proxied.url else " (on the address your browser shows)"
        html += line(f"Through Jupyter{where}", proxied.root) + f"<div style='color:#555'>{proxied.auth()}</div>"
        if not proxied.proxy_installed:
            html += "<div style='color:#b00020'>This needs <code>pip install jupyter-server-proxy</code>.</div>"
    return html


def _controls() -> SimpleNamespace:
    return SimpleNamespace(
        host=widgets.Text(value="127.0.0.1", description="Host"),
        port=widgets.BoundedIntText(value=8000, min=0, max=65535, description="Port"),
        api_key=widgets.Password(description="API key", placeholder="no key"),
        toggle=widgets.ToggleButton(description="Start server", icon="play"),
        url=widgets.HTML(),
        counters=widgets.HTML(),
        snippets=widgets.HTML(),
        error=widgets.HTML(),
    )


def _layout(ui: SimpleNamespace) -> list[widgets.Widget]:
    return [widgets.HBox([ui.host, ui.port]), widgets.HBox([ui.api_key, ui.toggle]), ui.url, ui.counters,
            ui.snippets, ui.error]


def _running(pool: Pool) -> Server | None:
    """This pool's server, wherever it was started (a panel, ``%mlx serve``, ``serve()``)."""
    servers = running_servers(pool)
    return servers[0] if servers else None


def _counters_html(stats: dict) -> str:
    tps = stats.get("tokens_per_second")
    return (f"requests: <b>{stats['requests']}</b> · active streams: <b>{stats['active_streams']}</b>"
            f" · tokens/s: <b>{'–' if tps is None else f'{tps:.1f}'}</b>")


def _all_snippets_html(server: Server, model: str) -> str:
    """Client snippets for this machine and, on a hub, through the Jupyter server."""
    html = _snippets_html(_snippets(server.url, server.api_key, model))
    if server.proxied is not None:
        html += ("<div style='margin-top:8px'><b>Through Jupyter, from outside this machine</b></div>"
                 + _snippets_html(_snippets(server.proxied.root, server.api_key, model, jupyter=True)))
    return html


def _refresh(pool: Pool, ui: SimpleNamespace) -> None:
    """Show whether the server runs: the toggle, and its URLs, counters and snippets."""
    server = _running(pool)
    ui.toggle.value = server is not None
    ui.toggle.description, ui.toggle.icon = ("Stop server", "stop") if server else ("Start server", "play")
    ui.host.disabled = ui.port.disabled = ui.api_key.disabled = server is not None
    if server is None:
        ui.url.value = "<i>Server stopped.</i>"
        ui.counters.value = ui.snippets.value = ""
        return
    ui.url.value = _urls_html(server)
    ui.counters.value = _counters_html(server.stats())
    ready = ready_options(pool)
    ui.snippets.value = _all_snippets_html(server, ready[0][0] if ready else "MODEL")


def _start(pool: Pool, audit: AuditLog, ui: SimpleNamespace) -> None:
    ui.error.value = ""
    try:
        serve(pool=pool, audit=audit, host=ui.host.value.strip(), port=ui.port.value, api_key=ui.api_key.value or None)
    except Exception as e:
        ui.error.value = error_html(e)
    _refresh(pool, ui)


def _stop(pool: Pool, ui: SimpleNamespace) -> None:
    server = _running(pool)
    if server is None:
        return
    try:
        server.stop()
    except Exception as e:
        ui.error.value = error_html(e)
    _refresh(pool, ui)


def _on_toggle(pool: Pool, audit: AuditLog, ui: SimpleNamespace, change: dict) -> None:
    server = _running(pool)
    if change["new"] and server is None:
        _start(pool, audit, ui)
    elif not change["new"] and server is not None:
        _stop(pool, ui)


def server_panel(pool: Pool | None = None, audit: AuditLog | None = None) -> widgets.VBox:
    """Start and stop the HTTP server on the pool; its URL, live counters and client snippets."""
    pool = pool_or_default(pool)
    audit = audit_or_default(audit, pool)
    call = ui_caller()
    ui = _controls()
    ui.toggle.observe(lambda change: _on_toggle(pool, audit, ui, change), "value")
    refresh_soon = coalesced(call, lambda: _refresh(pool, ui))
    settled = coalesced(call, lambda: _refresh(pool, ui), delay=SETTLE)

    def on_event(event: PoolEvent) -> None:
        refresh_soon()
        if isinstance(event, RequestEvent):
            settled()  # the server updates its counters just after the pool's event

    cleanups = [pool.subscribe(on_event), on_servers_changed(refresh_soon)]
    _refresh(pool, ui)
    return make_panel(_layout(ui), vars(ui), cleanups)
