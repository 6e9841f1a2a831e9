"""What the pool needs of a model served by other processes: submit, cancel, close, the same events.

A remote runner (:class:`~.sharded.ShardedModel`, :class:`~.attached.AttachedModel`) takes
:class:`~mlx_manager_nb.engine.Request` objects like the engine does and answers through their
``emit`` with the engine's ``Delta``/``Done``/``Failed`` events, from its own I/O thread: no MLX work
happens on the engine thread for it. Cancellation and deadlines are read from the request, as the
engine reads them, by polling every :data:`POLL_SECONDS`.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from dataclasses import dataclass

from ..engine import Delta, Done, Event, Failed, Request

POLL_SECONDS = 0.05


@dataclass
class Flight:
    """A request on its way through a remote runner."""

    request: Request
    first: float | None = None  # perf_counter time of its first delta
    ending: str | None = None  # "cancelled" or "timeout" once the remote side was asked to end it


class Flights:
    """The in-flight requests of one remote runner, keyed by the id the remote side knows them by."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._flights)

    def add(self, request: Request) -> str:
        with self._lock:
            rid = str(next(self._ids))
            self._flights[rid] = Flight(request)
        return rid

    def get(self, rid: str) -> Flight | None:
        return self._flights.get(rid)

    def to_end(self) -> list[tuple[str, str]]:
        """(id, "cancelled" | "timeout") for each request newly cancelled or past its deadline; marks them."""
        now, out = time.perf_counter(), []
        with self._lock:
            for rid, f in self._flights.items():
                if f.ending is None:
                    if f.request.cancelled.is_set():
                        f.ending = "cancelled"
                    elif f.request.deadline and now > f.request.deadline:
                        f.ending = "timeout"
                    else:
                        continue
                    out.append((rid, f.ending))
        return out

    def delta(self, rid: str, text: str) -> None:
        f = self._flights.get(rid)
        if f is None:
            return
        if f.first is None:
            f.first = time.perf_counter()
        try:
            f.request.emit(Delta(text))
        except Exception as e:  # the consumer broke: end the request, as the engine does
            self.finish(rid, Failed(e))
            f.request.cancelled.set()

    def done(self, rid: str, reason: str, stop: str | None, prompt_tokens: int, completion_tokens: int,
             cached_tokens: int, produced: bool) -> None:
        """End a request with the remote side's figures; ttft and duration are measured here, in the kernel.
        ``produced``: the remote side saw a first token (that may have carried no text)."""
        f = self._flights.get(rid)
        if f is None:
            return
        now = time.perf_counter()
        first = f.first if f.first is not None else now if produced else None
        ttft = first - f.request.submitted if first is not None else None
        self.finish(rid, Done(reason, stop, prompt_tokens, completion_tokens, cached_tokens, ttft,
                              now - f.request.submitted))

    def finish(self, rid: str, event: Done | Failed) -> None:
        with self._lock:
            f = self._flights.pop(rid, None)
        if f is not None:
            _emit(f.request, event)

    def fail_all(self, error: BaseException) -> None:
        with self._lock:
            flights, self._flights = list(self._flights.values()), {}
        for f in flights:
            f.request.cancelled.set()
            _emit(f.request, Failed(error))


def _emit(request: Request, event: Event) -> None:
    """Deliver a final event; a consumer that is gone cannot be told."""
    with contextlib.suppress(Exception):
        request.emit(event)
