"""The consumer side of a request: a finished result, or a stream of text deltas, sync or async.

A chat with tools or a schema also gets, from the pool, :class:`~mlx_manager_nb.tools.CallPiece`
events as each call is generated, a :class:`~mlx_manager_nb.tools.ToolCall` event as it completes,
and a :class:`Final` event in place of the engine's ``Done``. Iterating a stream yields text only;
:meth:`TextStream.events` yields text and calls in order (and the pieces, when asked).

Events arrive on the engine thread; a sync stream reads them from a ``queue.Queue``, an async
stream from an ``asyncio.Queue`` fed through ``loop.call_soon_threadsafe``. Leaving a stream early
(``close()``, ``break``, KeyboardInterrupt, a cancelled task) cancels the request in the engine.
A stream left unread is parked by the engine once its queue holds a few events, and resumes when
read again (see :mod:`mlx_manager_nb.engine`, backpressure): each sink gives the engine its backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Any

from .engine import Delta, Done, Event, Request, cut
from .errors import AnswerCutError
from .logprobs import TokenLogprob
from .tools import CallPiece, ToolCall


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Result:
    """A finished generation."""

    id: str
    model: str
    text: str
    finish_reason: str  # "stop", "length", "tool_calls", "cancelled" or "timeout"
    stop: str | None  # the stop string that matched, if one did
    usage: Usage
    ttft: float | None  # seconds to the first token
    tokens_per_second: float | None
    duration: float
    tool_calls: list[ToolCall] = field(default_factory=list)  # the text holds what is not a call
    parsed: Any = None  # the structured answer when a schema was given: a pydantic object or a dict
    constrained: bool = False  # whether a grammar constrained the text
    logprobs: list[TokenLogprob] | None = None  # per token of the text, when asked (see mlx_manager_nb.logprobs)


@dataclass(frozen=True)
class Final:
    """The pool's last event for a chat with tools or a schema: the engine's ``Done`` (its
    finish_reason ``tool_calls`` when the model called tools) and what was parsed from the text."""

    done: Done
    tool_calls: list[ToolCall]
    parsed: Any
    constrained: bool


def make_result(request_id: str, model: str, text: str, end: Done | Final,
                logprobs: list[TokenLogprob] | None = None) -> Result:
    d = end.done if isinstance(end, Final) else end
    usage = Usage(d.prompt_tokens, d.completion_tokens, d.cached_tokens)
    result = Result(request_id, model, text, d.finish_reason, d.stop, usage, d.ttft, d.tokens_per_second, d.duration,
                    logprobs=logprobs)
    if isinstance(end, Final):
        result = replace(result, tool_calls=end.tool_calls, parsed=end.parsed, constrained=end.constrained)
    return result


StreamItem = str | CallPiece | ToolCall
StreamEvent = Event | CallPiece | ToolCall | Final  # what the pool sends a stream: the engine's events, calls, Final
GOING_ON = (Delta, CallPiece, ToolCall)  # the events that are not a request's last


def _consume(stream: TextStream | AsyncTextStream, event: StreamEvent) -> StreamItem | None:
    """Apply one event to a stream: the delta's text or the call, None at the end, or the failure raised."""
    if isinstance(event, Delta):
        stream.text += event.text
        if stream.logprobs is not None:
            stream.logprobs += event.logprobs
        return event.text
    if isinstance(event, ToolCall):
        stream.tool_calls.append(event)
        return event
    if isinstance(event, CallPiece):
        return event
    if isinstance(event, (Done, Final)):
        cause = (event.done if isinstance(event, Final) else event).cause
        if cause is not None:  # the server cut it: an answer that is not whole must not look finished
            raise AnswerCutError(cause)
        stream.result = make_result(stream.id, stream.model, stream.text, event, stream.logprobs)
        return None
    raise event.error


class TextStream:
    """Iterate over text deltas; ``.text`` holds what arrived so far, ``.result`` the end.

    >>> s = pool.chat([{"role": "user", "content": "Hi"}], stream=True)
    >>> for delta in s: print(delta, end="")
    >>> s.result.usage.completion_tokens
    """

    def __init__(self, request_id: str, model: str, request: Request, events: queue.Queue):
        self.id, self.model, self.text = request_id, model, ""
        self.result: Result | None = None
        self.tool_calls: list[ToolCall] = []  # the calls completed so far
        self.logprobs: list[TokenLogprob] | None = [] if request.params.logprobs else None  # per token so far
        self._request, self._events = request, events
        self._it = self._iterate()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while not isinstance(item := next(self._it), str):
            pass
        return item

    def events(self, pieces: bool = False) -> Generator[StreamItem, None, None]:
        """Text deltas and :class:`~mlx_manager_nb.tools.ToolCall` objects, in the order they complete;
        with ``pieces``, each call's :class:`~mlx_manager_nb.tools.CallPiece` s before it, as it is generated."""
        try:
            for item in self._it:
                if pieces or not isinstance(item, CallPiece):
                    yield item
        finally:  # leaving early cancels the request, as leaving the stream does
            self._it.close()

    def close(self) -> None:
        """Stop reading; the engine drops the request within one step. Safe from any thread."""
        self._request.cancelled.set()
        # ValueError: another thread is iterating; it ends when the engine reports the cancel
        with contextlib.suppress(ValueError):
            self._it.close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _iterate(self) -> Generator[StreamItem, None, None]:
        try:
            while (item := _consume(self, self._events.get())) is not None:
                if item != "":  # log-probabilities alone (of a tool call's tokens)
                    yield item
        finally:
            if self.result is None:
                self._request.cancelled.set()


def queue_sink() -> tuple[queue.Queue, Callable[[StreamEvent], None]]:
    """A sync stream's queue and what puts events in it; ``queue.qsize`` is its backlog."""
    q: queue.Queue = queue.Queue()
    return q, q.put


class AsyncTextStream:
    """The async twin of :class:`TextStream`: ``async for delta in stream``.

    The request is prepared (templated, tokenized, validated) on a worker thread, never on the
    event loop; a failure there is raised by the first ``__anext__``.
    """

    CLOSE_WAIT = 10.0  # seconds aclose() waits for the engine to confirm a cancelled request

    def __init__(self, started: asyncio.Future, events: asyncio.Queue):
        self.id = self.model = ""  # known once the request is prepared
        self.text = ""
        self.result: Result | None = None
        self.tool_calls: list[ToolCall] = []  # the calls completed so far
        self.logprobs: list[TokenLogprob] | None = None  # per token of the text so far, when the request asked
        self._started, self._events = started, events
        self._request: Request | None = None
        self._ended = False  # the engine's final event arrived
        self._it = self._iterate()

    @property
    def prompt_tokens(self) -> int:
        """The prompt's length in tokens, known from the first delta on."""
        return len(self._request.prompt) if self._request is not None else 0

    def __aiter__(self) -> AsyncTextStream:
        return self

    async def __anext__(self) -> str:
        while not isinstance(item := await self._it.__anext__(), str):
            pass
        return item

    async def events(self, pieces: bool = False) -> AsyncGenerator[StreamItem, None]:
        """Text deltas and :class:`~mlx_manager_nb.tools.ToolCall` objects, in the order they complete;
        with ``pieces``, each call's :class:`~mlx_manager_nb.tools.CallPiece` s before it, as it is generated."""
        async for item in self._it:
            if pieces or not isinstance(item, CallPiece):
                yield item

    async def aclose(self) -> None:
        """Stop reading and cancel the request; returns once the engine has ended it (and it is audited)."""
        self.cancel()
        await self._it.aclose()
        if self._request is not None and not self._ended:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._drain(), self.CLOSE_WAIT)

    async def collect(self) -> Result:
        """Read to the end and return the result."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    def cancel(self, cause: str | None = None) -> None:
        """Cancel the request (from the event loop's thread); the stream then ends as ``cancelled``, or
        raises :class:`~mlx_manager_nb.errors.AnswerCutError` where the server cuts it (``cause``
        ``"shutdown"``: a server's stop)."""
        if self._request is not None:
            cut(self._request, cause)
        elif not self._started.done():  # still being prepared: cancel it as soon as it is submitted
            self._started.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() else cut(f.result()[2], cause))

    async def _drain(self) -> None:
        while not self._ended:
            self._ended = not isinstance(await self._events.get(), GOING_ON)

    async def _iterate(self) -> AsyncGenerator[StreamItem, None]:
        try:
            self.id, self.model, self._request = await asyncio.shield(self._started)
            if self._request.params.logprobs:
                self.logprobs = []
            while True:
                event = await self._events.get()
                self._ended = not isinstance(event, GOING_ON)
                item = _consume(self, event)
                if item is None:
                    return
                if item != "":  # log-probabilities alone (of a tool call's tokens)
                    yield item
        finally:
            if self.result is None:
                self.cancel()


class _Counted(asyncio.Queue):
    """An async stream's queue, counting the events the engine sent and those its consumer took."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = self.taken = 0

    async def get(self) -> Any:
        event = await super().get()
        self.taken += 1
        return event

    def backlog(self) -> int:
        """Events sent and not taken yet, those still on their way to the loop included."""
        return self.sent - self.taken


def async_sink(loop: asyncio.AbstractEventLoop) -> tuple[_Counted, Callable[[StreamEvent], None]]:
    """An async stream's queue and what puts events in it (from the engine's thread); ``queue.backlog``."""
    q = _Counted()

    def put(event: StreamEvent) -> None:
        q.sent += 1
        loop.call_soon_threadsafe(q.put_nowait, event)

    return q, put
