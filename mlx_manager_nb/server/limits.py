"""Limits per client and per model: no client can hold the engine for the others.

A client (a script in a loop, an agent fanning out) with ``per_client`` requests running gets a
429 for the next one, and any client gets one when ``queued`` requests already wait for a batch
slot of the model it names; the 429 is in its protocol's shape (``rate_limit_error``) with
``retry-after``, which the official SDKs honour, and leaves an audit row. Requests from the
notebook (cells, widgets, the Python API) never pass through here: they are never refused.

A client is its address. The server has one API key, which every client shares, so counting by
key would make the per-client limit one for all clients together: one runaway would starve the
rest, the very thing the limit is for.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..errors import ApiError
from ..server_options import MAX_CLIENT_REQUESTS, MAX_MODEL_QUEUE

__all__ = ["MAX_CLIENT_REQUESTS", "MAX_MODEL_QUEUE", "Limits"]
RETRY_AFTER = 1  # seconds: a slot frees as soon as a request ends, and a refusal costs next to nothing


@dataclass
class Limits:
    """The limits of one app, and each client's requests running now (touched on the app's loop only)."""

    per_client: int = MAX_CLIENT_REQUESTS
    queued: int = MAX_MODEL_QUEUE
    running: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        for name, value in (("max_client_requests", self.per_client), ("max_model_queue", self.queued)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")

    @contextlib.contextmanager
    def client_slot(self, request: web.Request) -> Iterator[None]:
        """Count the request against its client while it runs; a 429 if the client is at its limit."""
        client = request.remote or "unknown"
        if self.running[client] >= self.per_client:
            raise _too_many(f"This client has {self.per_client} requests running, its limit: retry once one "
                            "has ended (the server's max_client_requests).")
        self.running[client] += 1
        try:
            yield
        finally:
            self.running[client] -= 1
            if not self.running[client]:
                del self.running[client]

    def check_queue(self, pool: Any, model: str) -> None:
        """A 429 if ``queued`` requests already wait for a batch slot of ``model`` (a name the pool resolves)."""
        info = pool.lookup(model)
        waiting = len(getattr(pool.runner(info.name), "waiting", ())) if info is not None else 0
        if waiting >= self.queued:
            raise _too_many(f"{waiting} requests are waiting for model {info.name!r}, its queue's limit: retry "
                            "shortly (the server's max_model_queue).")


def _too_many(message: str) -> ApiError:
    return ApiError(429, message, "rate_limit", headers={"retry-after": str(RETRY_AFTER)})
