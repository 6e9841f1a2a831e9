"""Hosted Jupyter (JupyterHub, Binder): the kernel's server as reachable through jupyter-server-proxy.

There the kernel's ports are not reachable from outside; with ``jupyter-server-proxy`` installed in
the Jupyter server, ``{base_url}proxy/{port}/`` forwards to ``localhost:{port}`` for whoever holds
the user's Jupyter token (the browser's session cookie, or ``Authorization: token TOKEN``).
JupyterHub tells its servers (and their kernels) their base URL in ``JUPYTERHUB_SERVICE_PREFIX``;
Binder runs on JupyterHub and sets it too.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX_VARIABLE = "JUPYTERHUB_SERVICE_PREFIX"
TOKEN_VARIABLE = "JUPYTERHUB_API_TOKEN"
TOKEN_PLACEHOLDER = "<JUPYTER_TOKEN>"


@dataclass(frozen=True)
class ProxiedURL:
    """The server's root through the Jupyter server: ``url`` (absolute where the hub's address is known)."""

    path: str  # "/user/ana/proxy/8000", no trailing slash: append "/v1" or "/health"
    url: str | None  # "https://hub.example.org/user/ana/proxy/8000", or None when only the path is known
    binder: bool
    hub_base: str  # the hub's base path, where /hub/token makes tokens
    proxy_installed: bool  # jupyter_server_proxy importable here (the kernel usually shares the server's env)

    @property
    def root(self) -> str:
        """The URL to give clients: absolute, else the path on the address the browser shows."""
        return self.url or self.path

    def auth(self) -> str:
        """How a client outside the browser authenticates to the Jupyter server, in one sentence."""
        where = ("the token in the Binder address (after <code>?token=</code>)" if self.binder else
                 f"a JupyterHub API token (made at <code>{self.hub_base}hub/token</code>)")
        return (f"Send {where} as the header <code>Authorization: token {TOKEN_PLACEHOLDER}</code>; "
                f"in this kernel <code>os.environ['{TOKEN_VARIABLE}']</code> holds one. "
                "In the browser the link works as it is.")

    def auth_text(self) -> str:
        """``auth()`` as plain text, for print()."""
        return self.auth().replace("<code>", "`").replace("</code>", "`")


def service_prefix(environ: Mapping[str, str] | None = None) -> str | None:
    """The Jupyter server's base path on JupyterHub or Binder (``/user/ana/``), or None elsewhere."""
    prefix = (os.environ if environ is None else environ).get(PREFIX_VARIABLE, "").strip()
    if not prefix:
        return None
    return "/" + prefix.strip("/") + "/" if prefix.strip("/") else "/"


def proxy_context(prefix: str, port: int) -> str:
    """The ``X-Forwarded-Context`` jupyter-server-proxy sends with what it forwards to ``port``."""
    return f"{prefix}proxy/{port}"


def proxied_url(port: int, environ: Mapping[str, str] | None = None) -> ProxiedURL | None:
    """Where a server on ``port`` is reachable through the hub's Jupyter server; None outside a hub."""
    env = os.environ if environ is None else environ
    prefix = service_prefix(env)
    if prefix is None:
        return None
    path = proxy_context(prefix, port)
    public = env.get("JUPYTERHUB_PUBLIC_URL", "").strip()  # the server's public URL (JupyterHub >= 4.1)
    origin = (env.get("JUPYTERHUB_EXTERNAL_URL") or env.get("JUPYTERHUB_HOST") or "").strip().rstrip("/")
    if public:
        url: str | None = public.rstrip("/") + f"/proxy/{port}"
    elif origin.startswith(("http://", "https://")):
        url = origin + path
    else:
        url = None
    binder = any(k.startswith("BINDER_") for k in env)
    hub_base = "/" + env.get("JUPYTERHUB_BASE_URL", "/").strip("/") + "/"
    return ProxiedURL(path, url, binder, hub_base.replace("//", "/"),
                      importlib.util.find_spec("jupyter_server_proxy") is not None)
