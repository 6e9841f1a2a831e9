"""One adapter per protocol, and the one handler every chat endpoint runs.

A protocol module gives an :class:`Adapter` (its error body, the HTTP statuses where it differs, its
names for the few request fields the pool can name in an error) and a parser that turns a body into
an :class:`Answer`: the protocol-neutral :class:`~mlx_manager_nb.request.ChatRequest`, the final
JSON body and the stream's shape. :func:`chat_handler` runs the rest, the same for all: the model and
stream fields, the model's name, the request's context, the run and its errors, before and during a
stream. A new protocol is one module and one route line (``app.router.add_post(path, chat_handler(...))``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from ..errors import AnswerCutError, ApiError, ContextLengthError, PoolFullError, kind_of, status_of
from ..request import ChatRequest
from .common import LIMITS, MODEL, POOL, STREAM, endpoint, field_of, http_context, resolve_model
from .streaming import StreamShape, respond

if TYPE_CHECKING:
    from ..streams import Result


@dataclass(frozen=True)
class Adapter:
    """A protocol's terms: ``name`` as audit rows record it (``openai`` or ``anthropic``, whose
    responses also carry ``request-id``), its error body, ``statuses`` where its HTTP status for a kind
    of error differs, and ``fields``: its names for the request fields the pool can name in an error
    (``messages``, ``prompt``, ``max_tokens``, ``schema``)."""

    name: str
    error_body: Callable[[ApiError], dict]
    fields: Mapping[str, str] = field(default_factory=dict)
    statuses: Mapping[str, int] = field(default_factory=dict)
    context_message: Callable[[ContextLengthError], str] | None = None

    def error(self, e: Exception) -> ApiError:
        """The error a failure answers with, in this protocol's terms."""
        if isinstance(e, ApiError):
            return e
        kind = kind_of(e)
        status = self.statuses.get(kind, status_of(e))
        if isinstance(e, (PoolFullError, AnswerCutError)):
            return ApiError(status, f"{e} Retry later.", kind, headers={"retry-after": "5"})
        message = str(e) if status < 500 else f"Internal error: {type(e).__name__}: {e}"
        if isinstance(e, ContextLengthError) and self.context_message is not None:
            message = self.context_message(e)
        param = getattr(e, "param", None)
        if param is None and kind == "not_found":
            param = "model"
        return ApiError(status, message, kind, self.fields.get(param, param) if param else None)


@dataclass(frozen=True)
class Answer:
    """A parsed request, and how to answer it: ``final(result)`` is the JSON body, ``shape`` the stream."""

    request: ChatRequest
    final: Callable[[Result], dict]
    shape: StreamShape


Parse = Callable[[web.Request, dict, str, bool], Awaitable[Answer]]  # (request, body, model, stream)


def chat_handler(adapter: Adapter, parse: Parse) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """The endpoint of a chat protocol: ``parse`` reads the body (naming a bad field in its own terms)."""

    async def handle(request: web.Request, body: dict) -> web.StreamResponse:
        model = field_of(body, "model", str, required=True)
        request[MODEL] = model
        stream = request[STREAM] = field_of(body, "stream", bool, default=False)
        answer = await parse(request, body, model, stream)
        name = await resolve_model(request, model)
        pool = request.app[POOL]
        request.app[LIMITS].check_queue(pool, name)
        context = http_context(request, adapter.name, stream)
        return await respond(request, adapter, lambda: pool.astream(answer.request, name, context), stream,
                             answer.final, answer.shape)

    return endpoint(adapter, handle)
