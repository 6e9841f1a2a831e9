"""One request's run on the pool, answered as JSON or as server-sent events.

Every protocol shares this loop; each gives only its shapes: the final JSON body, and a
:class:`StreamShape` saying which events open, carry, close and fail a stream. A failure is
named by the protocol's adapter, before a stream's headers and after them alike.

A stream's connection buffers at most about :data:`SEND_BUFFER` bytes (in the kernel, and as much
again in the loop) for a client that stops reading: its writes then wait, the handler stops taking
events, and the engine parks the request (see :mod:`mlx_manager_nb.engine`, backpressure). A
client that reads nothing for the engine's ``unread_timeout`` loses its stream and its connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..errors import ApiError
from ..streams import AsyncTextStream, Result, StreamItem
from ..tools import CallPiece, ToolCall
from .common import AUDITED, POOL, STATS, id_headers

if TYPE_CHECKING:
    from .adapter import Adapter

SseEvent = tuple[str | None, Any]  # (event name or None, data: JSON-encoded unless a string)
SEND_BUFFER = 4 * 1024  # bytes: a stream's kernel send buffer (which Linux doubles) and loop buffer


@dataclass(frozen=True)
class StreamShape:
    """How a protocol frames a stream; each function returns the events to send, in order."""

    start: Callable[[AsyncTextStream], list[SseEvent]]
    delta: Callable[[str], list[SseEvent]]
    end: Callable[[Result], list[SseEvent]]
    error: Callable[[ApiError], list[SseEvent]]  # a failure after the first event, in the adapter's terms
    call_piece: Callable[[CallPiece], list[SseEvent]] | None = None  # a tool call's name, or arguments text
    tool_call: Callable[[ToolCall], list[SseEvent]] | None = None  # a tool call complete, after its pieces


async def send_events(response: web.StreamResponse, events: list[SseEvent]) -> None:
    """Write server-sent events in one write."""
    out = []
    for name, data in events:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        out.append((f"event: {name}\n" if name else "") + f"data: {text}\n\n")
    await response.write("".join(out).encode())


def _bound_buffers(request: web.Request) -> Callable[[], None]:
    """Keep a stream's unread bytes few, so that a client that stops reading is noticed soon; returns
    what gives the connection large buffers back for the answers that follow on it."""
    transport = request.transport
    if transport is None:
        return lambda: None
    sock = transport.get_extra_info("socket")
    low, high = transport.get_write_buffer_limits()
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    transport.set_write_buffer_limits(high=SEND_BUFFER)

    def restore() -> None:
        if transport.is_closing():
            return
        if sock is not None:  # the system's maximum (net.core.wmem_max) caps it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        transport.set_write_buffer_limits(high, low)

    return restore


async def _sent(request: web.Request, s: AsyncTextStream, unread_timeout: float) -> None:
    """Wait until the client has taken what was written; one that reads nothing for ``unread_timeout``
    seconds has its stream cut (cause ``"unread"``) and its connection closed."""
    try:
        await asyncio.wait_for(request.writer.drain(), unread_timeout)
    except asyncio.TimeoutError:
        s.cancel("unread")
        if request.transport is not None:
            request.transport.abort()  # what it did not read is dropped: close() would wait for it
        raise ConnectionResetError(f"the client read nothing for {unread_timeout:g} s") from None


async def respond(request: web.Request, adapter: Adapter, run: Callable[[], AsyncTextStream], stream: bool,
                  final: Callable[[Result], dict], shape: StreamShape) -> web.StreamResponse:
    """Run ``run()`` (a pool call returning a stream) and answer with ``final(result)`` or a shaped stream.

    A stream's first delta is read before any byte is sent, so a failure up to then still gets
    its HTTP status; a failure after it becomes the protocol's error event, of the same kind as the
    adapter names it, then a clean end. A client that goes away cancels its request, streamed or
    not; either way the request has ended in the engine (and left its audit row) when this returns.
    """
    stats = request.app[STATS]
    stats.requests += 1
    stats.in_flight += 1
    stats.active_streams += stream
    s = run()
    stats.streams.add(s)
    request[AUDITED] = True  # from here on the pool records the request, refused or not
    try:
        if not stream:
            result = await s.collect()
            stats.finished(result.usage.completion_tokens, result.duration)
            return web.json_response(final(result))
        events = s.events(pieces=True)  # text deltas, tool calls' pieces and the calls, in order
        try:
            first: StreamItem | None = await events.__anext__()
        except StopAsyncIteration:
            first = None
        response = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache",
                                               **id_headers(request, adapter.name)})
        await response.prepare(request)
        restore_buffers = _bound_buffers(request)
        unread_timeout = request.app[POOL].engine.unread_timeout

        def shaped(item: StreamItem) -> list[SseEvent]:
            if isinstance(item, str):
                return shape.delta(item)
            if isinstance(item, CallPiece):
                return shape.call_piece(item) if shape.call_piece else []
            return shape.tool_call(item) if shape.tool_call else []

        try:
            await send_events(response, shape.start(s) + (shaped(first) if first is not None else []))
            async for item in events:
                await _sent(request, s, unread_timeout)
                await send_events(response, shaped(item))
            assert s.result is not None
            await send_events(response, shape.end(s.result))
            stats.finished(s.result.usage.completion_tokens, s.result.duration)
        except ConnectionError:
            raise
        except Exception as e:
            await send_events(response, shape.error(adapter.error(e)))
        restore_buffers()
        return response
    finally:
        await s.aclose()
        stats.streams.discard(s)
        stats.in_flight -= 1
        stats.active_streams -= stream
