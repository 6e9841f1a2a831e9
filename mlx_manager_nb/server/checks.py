"""Where a request's schemas and tools are checked: off the event loop, in a pool of their own, at most
:attr:`~mlx_manager_nb.schema_limits.SchemaLimits.per_client` requests of one client at once, within
a time budget, and stopped when the client leaves (a queued check then never starts).

Images are decoded the same way (see :mod:`mlx_manager_nb.images`): a request holding one is
checked in the pool, under its client's gate and budget. Requests with neither are parsed through
:func:`~mlx_manager_nb.server.common.off_loop` as before: no client's schemas or images can hold them up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from ..images import downloader, in_body, reading
from ..priority import lower_this_thread
from ..schema_limits import LIMITS, Budget, budget
from .common import OPTIONS, off_loop

T = TypeVar("T")
WORKERS = 4  # threads checking schemas, for all clients together
_pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="mlx-schema-checks", initializer=lower_this_thread)
# per (event loop, client address): its gate and how many requests hold or await it
_gates: dict[tuple[int, str], tuple[asyncio.Semaphore, int]] = {}


async def _ended(work: Future) -> None:
    """Wait until ``work`` has ended (at once if it never started), whatever its outcome."""
    loop = asyncio.get_running_loop()
    ended = asyncio.Event()

    def done(_: Future) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(ended.set)

    work.add_done_callback(done)
    await ended.wait()


def has_schemas(body: dict, *fields: str) -> bool:
    """Whether ``body`` sets any of ``fields`` (the protocol's tools and output formats)."""
    return any(body.get(name) not in (None, [], {}) for name in fields)


async def has_images(body: dict, key: str) -> bool:
    """Whether the messages (or input items) under ``key`` hold an image part; looked for off the event loop."""
    return await off_loop(in_body, body, key)


async def checked(request: web.Request, untrusted: bool, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` off the event loop, its images counted as one request's (and downloaded where the
    server allows it); when ``untrusted`` (the body holds schemas or images), in the check pool under
    the client's gate and a :class:`~mlx_manager_nb.schema_limits.Budget`."""
    loop = asyncio.get_running_loop()
    fetch = downloader(loop) if request.app[OPTIONS].allow_image_urls else None

    def read() -> T:
        with reading(fetch):
            return fn(*args)

    if not untrusted:
        return await off_loop(read)
    client = id(loop), request.remote or ""
    gate, waiting = _gates.get(client, (asyncio.Semaphore(LIMITS.per_client), 0))
    _gates[client] = gate, waiting + 1
    b = Budget(LIMITS.check_seconds)

    def run() -> T:
        with budget(b):
            return read()

    try:
        async with gate:
            work = _pool.submit(run)
            try:
                return await asyncio.wrap_future(work)
            except asyncio.CancelledError:  # the client left: its checks stop at their next step...
                b.cancelled.set()
                await _ended(work)  # ...and its gate opens once they have
                raise
    finally:
        gate, waiting = _gates[client]
        if waiting == 1:
            del _gates[client]
        else:
            _gates[client] = gate, waiting - 1
