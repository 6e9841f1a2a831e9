"""The in-kernel HTTP server: the OpenAI and Anthropic protocols over the shared pool.

>>> from mlx_manager_nb.server import serve
>>> server = serve(port=8000)        # in a notebook: on the kernel's loop, the cell returns at once
>>> server.url
'http://127.0.0.1:8000'
>>> server.stop()

``create_app()`` returns the endpoints as an aiohttp application without a ``/v1`` prefix of its
own, to mount in another app: ``parent.add_subapp("/v1", create_app(pool=pool))``.

A cell cannot call a server that runs on its own kernel's loop synchronously (the cell blocks the
loop the server needs); use the in-process API (``pool.chat``) there, or ``serve(mode="thread")``.
"""

from __future__ import annotations

import asyncio
import atexit
import errno
import ipaddress
import socket
import threading
import time
import weakref
from typing import Any

from aiohttp import web

from . import anthropic_api, embeddings_api, openai_api
from .errors import ServerError
from .http_common import OPTIONS, POOL, STATS, Options, Stats, endpoint

V1 = web.AppKey("v1", web.Application)

MAX_BODY = 8 * 2**20
CORS_HEADERS = "authorization, content-type, x-api-key, anthropic-version, anthropic-beta, x-request-id"
_servers: "weakref.WeakSet[Server]" = weakref.WeakSet()


def _default_pool() -> Any:
    import mlx_manager_nb

    return mlx_manager_nb.pool


def create_app(pool: Any = None, audit: Any = None, *, api_key: str | None = None, auto_load: bool = True,
               aliases: dict[str, str] | None = None, max_body: int = MAX_BODY) -> web.Application:
    """The /v1 endpoints as an app with no prefix of its own, over a pool shared with the notebook.

    ``audit`` overrides where this app's requests are recorded (default: the pool's audit log).
    ``aliases`` maps names clients send (``"gpt-4o-mini"``) to loaded models. The app neither loads
    nor unloads models on startup or cleanup; ``auto_load`` loads a local model on its first request.
    Mounted in a parent app, the parent's ``client_max_size`` bounds request bodies.
    """
    app = web.Application(client_max_size=max_body)
    app[POOL] = pool if pool is not None else _default_pool()
    app[OPTIONS] = Options(api_key=api_key, auto_load=auto_load, aliases=dict(aliases or {}), audit=audit)
    app[STATS] = Stats()
    app.router.add_get("/models", endpoint("openai", openai_api.models, body=False))
    app.router.add_post("/chat/completions", endpoint("openai", openai_api.chat_completions))
    app.router.add_post("/completions", endpoint("openai", openai_api.completions))
    app.router.add_post("/embeddings", endpoint("openai", embeddings_api.embeddings))
    app.router.add_post("/messages", endpoint("anthropic", anthropic_api.messages))
    app.router.add_post("/messages/count_tokens", endpoint("anthropic", anthropic_api.count_tokens))
    return app


def _cors(origins: tuple[str, ...]):
    @web.middleware
    async def preflight(request: web.Request, handler):
        if request.method == "OPTIONS" and "access-control-request-method" in request.headers:
            return web.Response(status=204)
        return await handler(request)

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("origin")
        if origin and (origin in origins or "*" in origins):
            response.headers.update({
                "access-control-allow-origin": origin,
                "access-control-allow-methods": "GET, POST, OPTIONS",
                "access-control-allow-headers": CORS_HEADERS,
                "access-control-expose-headers": "x-request-id",
                "vary": "origin",
            })

    return preflight, add_headers


async def _health(request: web.Request) -> web.Response:
    health = request.app[V1][POOL].health()
    return web.json_response(dict(health, status="ok" if health["engine"] != "dead" else "error"),
                             status=200 if health["engine"] != "dead" else 503)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ServerError(f"Port {port} on {host} is in use: stop what holds it or choose another --port") from None
        raise ServerError(f"Cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


class Server:
    """A running server: ``url``, ``stats()`` and ``stop(drain=...)``."""

    def __init__(self, root: web.Application, v1: web.Application, sock: socket.socket, mode: str):
        self.mode, self._root, self._v1, self._sock = mode, root, v1, sock
        host, port = sock.getsockname()[:2]
        self.host, self.port = host, port
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.started = time.time()
        self.running = True
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: Any = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Server {self.url} ({self.mode} mode, {state})>"

    def stats(self) -> dict:
        """Requests served, streams open now and recent tokens per second."""
        return self._v1[STATS].as_dict()

    async def _astart(self) -> None:
        self._runner = web.AppRunner(self._root, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, self._sock).start()

    async def _astop(self, drain: float) -> None:
        if self._ready is not None and not self._ready.done():
            await self._ready
        for site in list(self._runner.sites):
            await site.stop()  # no new connections from here on
        end = time.monotonic() + drain
        while self._v1[STATS].active_streams and time.monotonic() < end:
            await asyncio.sleep(0.05)
        await self._runner.cleanup()  # cancels what is still streaming; their requests are cancelled
        self._sock.close()
        audit = self._v1[OPTIONS].audit or getattr(self._v1[POOL], "audit", None)
        if audit is not None:  # the rows of the requests just ended are written before stop returns
            await asyncio.get_running_loop().run_in_executor(None, audit.flush)

    def _start(self) -> None:
        if self.mode == "kernel":
            self._loop = asyncio.get_running_loop()
            self._ready = self._loop.create_task(self._astart())
        else:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="mlx-nb-server", daemon=True)
            self._thread.start()
            asyncio.run_coroutine_threadsafe(self._astart(), self._loop).result()
        _servers.add(self)

    def stop(self, drain: float = 5.0) -> Any:
        """Stop accepting, let open streams finish for up to ``drain`` seconds, then cancel them.

        Thread mode blocks until stopped. Kernel mode returns the shutdown task (awaitable), since
        the cell runs on the loop that must do the work.
        """
        if not self.running:
            return None
        self.running = False
        _servers.discard(self)
        if self.mode == "thread":
            asyncio.run_coroutine_threadsafe(self._astop(drain), self._loop).result()
            # the loop's executor threads (model listing, audit flush) end with it
            asyncio.run_coroutine_threadsafe(self._loop.shutdown_default_executor(), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            return None
        try:
            in_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            in_loop = False
        if in_loop:
            return self._loop.create_task(self._astop(drain))
        return asyncio.run_coroutine_threadsafe(self._astop(drain), self._loop).result()

    async def astop(self, drain: float = 5.0) -> None:
        """``await server.astop()`` from the server's own loop."""
        task = self.stop(drain)
        if task is not None:
            await task


def serve(pool: Any = None, audit: Any = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          cors_origins: tuple[str, ...] | list[str] = (), mode: str | None = None, allow_remote: bool = False,
          max_body: int = MAX_BODY, **app_options: Any) -> Server:
    """Start the server: ``/v1/...`` endpoints and ``/health``; returns a :class:`Server`.

    ``mode="kernel"`` (the default where an event loop runs in this thread, as in Jupyter) serves on
    that loop and returns at once; ``mode="thread"`` (the default elsewhere) runs its own loop in a
    daemon thread. A non-loopback ``host`` needs an ``api_key`` unless ``allow_remote=True``.
    """
    if not _is_loopback(host) and api_key is None and not allow_remote:
        raise ServerError(f"Refusing to serve on {host} without an api_key: anyone on the network could use it. "
                          f"Pass api_key=..., or allow_remote=True if you mean it.")
    if mode is None:
        try:
            asyncio.get_running_loop()
            mode = "kernel"
        except RuntimeError:
            mode = "thread"
    if mode not in ("kernel", "thread"):
        raise ValueError(f"mode must be 'kernel' or 'thread', got {mode!r}")
    if mode == "kernel":
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ServerError("mode='kernel' needs a running event loop in this thread; use mode='thread'") from None
    preflight, add_headers = _cors(tuple(cors_origins))
    root = web.Application(middlewares=[preflight] if cors_origins else [], client_max_size=max_body)
    if cors_origins:
        root.on_response_prepare.append(add_headers)
    v1 = create_app(pool, audit, api_key=api_key, max_body=max_body, **app_options)
    root[V1] = v1
    root.add_subapp("/v1", v1)
    root.router.add_get("/health", _health)
    server = Server(root, v1, _bind(host, port), mode)
    server._start()
    return server


def running_servers() -> list[Server]:
    return list(_servers)


@atexit.register
def _stop_all() -> None:
    for server in list(_servers):
        if server.mode == "thread":
            server.stop(drain=1.0)
        else:
            server._sock.close()
