"""Connection hygiene: deadlines for slow or idle clients, a cap on open connections, JSON for malformed requests.

aiohttp does part of it: ``keepalive_timeout`` closes a connection that has not sent a complete
request's headers within that time of its previous answer, and its parser refuses a request line
or header over 8,190 bytes. :class:`Connections` adds the rest for one server: the same deadline
for a connection's first request, a deadline for a request's body, aiohttp's refusals in JSON,
and a cap on open connections below the process's open-file limit. Past the cap, a new connection
closes the oldest one that has no request in progress (half-open or idle), so ``/health`` and new
clients get in while running streams go on; when every connection is busy, it gets a 503 instead.
"""

from __future__ import annotations

import asyncio
import json
import resource
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from ..errors import ApiError
from ..server_options import BODY_TIMEOUT, IDLE_TIMEOUT, MAX_CONNECTIONS
from .openai_api import error_body

__all__ = ["BODY_TIMEOUT", "IDLE_TIMEOUT", "MAX_CONNECTIONS", "Connections", "default_max_connections"]
LINGER = 2.0  # seconds an unread body is drained after the answer before its connection closes


def default_max_connections() -> int:
    """:data:`MAX_CONNECTIONS`, or half the open-file limit where that is lower (mlx-lm lowers it to 2,048)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else max(8, min(MAX_CONNECTIONS, soft // 2))


class Connections:
    """The connections of one server and the limits they are held to (seconds and a count)."""

    def __init__(self, idle_timeout: float = IDLE_TIMEOUT, body_timeout: float = BODY_TIMEOUT,
                 max_connections: int | None = None) -> None:
        for name, value in (("idle_timeout", idle_timeout), ("body_timeout", body_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        max_connections = default_max_connections() if max_connections is None else max_connections
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections!r}")
        self.idle_timeout, self.body_timeout, self.max_connections = idle_timeout, body_timeout, max_connections
        self.open: dict[_Handler, None] = {}  # oldest first
        self.busy: set[Any] = set()  # connections whose request is being handled
        self.served: weakref.WeakSet[Any] = weakref.WeakSet()  # those that have sent a request

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
        """Mark the connection busy until its answer is written (see :meth:`_Handler.finish_response`);
        fail a body not in within ``body_timeout``."""
        protocol = request.protocol
        self.busy.add(protocol)
        self.served.add(protocol)
        late = asyncio.get_running_loop().call_later(self.body_timeout, _body_late, request, self.body_timeout)
        try:
            return await handler(request)
        finally:
            late.cancel()

    def protocol_factory(self, server: web.Server, **handler_args: Any) -> Callable[[], asyncio.BaseProtocol]:
        """What ``loop.create_server`` calls for each new connection: a request handler, within the cap."""
        loop = asyncio.get_running_loop()
        args = {**handler_args, "keepalive_timeout": self.idle_timeout, "lingering_time": LINGER}

        def make() -> asyncio.BaseProtocol:
            handler = _Handler(server, self, loop=loop, **args)
            self.open[handler] = None
            return handler

        return make

    def admit(self) -> bool:
        """Whether a connection just made may stay: under the cap, or once the oldest idle one is closed."""
        connected = [handler for handler in self.open if handler.transport is not None]  # not closing either
        if len(connected) < self.max_connections:
            return True
        idle = next((handler for handler in connected if handler not in self.busy), None)
        if idle is not None:
            idle.force_close()
        return idle is not None


def _body_late(request: web.Request, seconds: float) -> None:
    """Fail the read of a body that is still coming in; the handler answers the error in its protocol's shape."""
    if not request.content.is_eof():
        request.content.set_exception(ApiError(408, f"The request body did not arrive within {seconds:g} s"))


class _Handler(web.RequestHandler):
    """aiohttp's handler, with a deadline for the first request's headers and its refusals in JSON."""

    def __init__(self, manager: web.Server, connections: Connections, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._connections = connections
        self._first_deadline: asyncio.TimerHandle | None = None
        self._shed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._connections.admit():
            self._shed = True
            _shed(transport, self._connections.max_connections)
            return
        super().connection_made(transport)
        loop = asyncio.get_running_loop()
        self._first_deadline = loop.call_later(self._connections.idle_timeout, self._first_request_late)

    def data_received(self, data: bytes) -> None:
        if not self._shed:  # a shed connection's request is drained unread
            super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._connections.open.pop(self, None)
        self._connections.busy.discard(self)
        if self._first_deadline is not None:
            self._first_deadline.cancel()
        if not self._shed:
            super().connection_lost(exc)

    async def finish_response(self, request: Any, resp: web.StreamResponse, start_time: float | None) -> Any:
        """Write the answer; the connection stays busy (never shed by the cap) until it is written."""
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._connections.busy.discard(self)

    def _first_request_late(self) -> None:
        if self not in self._connections.served:
            self.force_close()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (or a handler's crash), as an OpenAI-shaped JSON error."""
        plain = super().handle_error(request, status, exc, message)  # logs it; raises if an answer has begun
        kind = "api" if status >= 500 else "too_large" if isinstance(exc, LineTooLong) else "invalid_request"
        text = "Internal server error" if status >= 500 else (message or getattr(plain, "text", "") or "Bad request")
        response = web.json_response(error_body(ApiError(status, text.strip()[:300], kind)), status=status)
        response.force_close()
        return response


def _shed(transport: asyncio.BaseTransport, limit: int) -> None:
    """Answer a connection over the cap, while every open one is busy, with a 503 in JSON, and close it."""
    assert isinstance(transport, asyncio.Transport)
    error = ApiError(503, f"The server has {limit} connections open, its limit: retry shortly.", "overloaded")
    body = json.dumps(error_body(error)).encode()
    transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    transport.write_eof()  # the client reads the answer, not a reset, while what it sent is drained
    asyncio.get_running_loop().call_later(LINGER, transport.close)
