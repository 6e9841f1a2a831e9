"""Notebook panels (ipywidgets) for the pool, chat, HTTP server and audit log.

>>> from mlx_manager_nb.widgets import dashboard
>>> dashboard()   # Pool, Chat, Server and Audit tabs on the default pool and audit log

Each panel is also usable alone (``pool_panel()``, ``chat_panel()``, ``server_panel()``,
``audit_panel()``). Panels follow the pool and audit log through their subscriptions; events
arrive on engine and writer threads and are hopped onto the loop that was running when the panel
was built (the kernel's). Slow actions (loading, unloading, generating) run in worker threads.
A panel's widgets are reachable as ``panel.parts`` (a namespace), e.g. ``panel.parts.load.click()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ipywidgets as widgets

from .panels.audit import audit_panel
from .panels.chat import chat_panel
from .panels.common import audit_or_default, on_close, pool_or_default
from .panels.pool import pool_panel
from .panels.server import server_panel

if TYPE_CHECKING:
    from .audit_log import AuditLog
    from .model_pool import Pool

__all__ = ["audit_panel", "chat_panel", "dashboard", "pool_panel", "server_panel"]


def dashboard(pool: Pool | None = None, audit: AuditLog | None = None) -> widgets.Tab:
    """The pool, chat, server and audit panels in tabs."""
    pool = pool_or_default(pool)
    audit = audit_or_default(audit, pool)
    panels = [pool_panel(pool), chat_panel(pool), server_panel(pool, audit), audit_panel(audit)]
    tab = widgets.Tab(children=panels, titles=["Pool", "Chat", "Server", "Audit"])
    on_close(tab, *(p.close for p in panels))
    return tab
