"""Exception types: each failure a user can cause has its own, with a message naming what is wrong.

Each class says what kind of failure it is (``kind``, protocol-neutral: ``invalid_request``,
``not_found``, ``context_length``, ``overloaded``, ``api``...) and the HTTP status it answers with
(``status``): the server's error bodies and the audit log's ``http_status`` read them here.
"""

from __future__ import annotations

from typing import ClassVar


class MLXManagerError(Exception):
    """Base class for every error this library raises on purpose."""

    kind = "api"
    status = 500


class ModelNotFoundError(MLXManagerError, LookupError):
    """A model reference matches nothing: no path, store entry, cached repo or loaded model."""

    kind = "not_found"
    status = 404


class InvalidModelError(MLXManagerError, ValueError):
    """A model folder or file exists but cannot be used (missing config, tokenizer, corrupt weights)."""

    kind = "invalid_request"
    status = 400


class UnsupportedModelError(InvalidModelError):
    """A model uses an architecture, tensor type or tokenizer this library does not support."""


class DemoModelUnavailableError(MLXManagerError):
    """The demo model is not cached and cannot be fetched (offline)."""


class PoolFullError(MLXManagerError):
    """Loading would exceed the pool's limits and nothing can be evicted."""

    kind = "overloaded"
    status = 503


class AnswerCutError(MLXManagerError):
    """An answer the server cut before its end (``cause``: ``"shutdown"``, a server's stop or drain;
    ``"unread"``, a stream left unread past its idle time): what arrived is not the whole answer."""

    kind = "api"
    status = 503
    CAUSES: ClassVar[dict[str, str]] = {"shutdown": "The server stopped before this answer was finished.",
                                         "unread": "This stream was left unread too long and was cancelled."}

    def __init__(self, cause: str):
        super().__init__(self.CAUSES[cause])
        self.cause = cause


class EngineError(MLXManagerError):
    """A failure inside the inference engine."""


class ServerError(MLXManagerError):
    """The HTTP server cannot start or stop as asked (port in use, already running, unsafe bind)."""


class InvalidParameterError(MLXManagerError, ValueError):
    """A request parameter is invalid; ``param`` names it (``"temperature"``, ``"messages[2].role"``)."""

    kind = "invalid_request"
    status = 400

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidParameterError):
    """The prompt (with ``max_tokens``) does not fit the model's context: ``tokens`` > ``limit``.

    ``param`` is ``"messages"`` or ``"prompt"`` (a chat's messages or a completion's prompt alone are
    too long) or ``"max_tokens"`` (they fit, but not with the tokens asked for): each protocol names
    that field in its own terms.
    """

    kind = "context_length"

    def __init__(self, param: str, message: str, tokens: int, limit: int):
        super().__init__(param, message)
        self.tokens, self.limit = tokens, limit


class ApiError(MLXManagerError):
    """A request refused before it reached the pool, with its own status and kind (a protocol's parser
    raises it: a missing field, an unknown route, a bad API key)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers or {}


def status_of(error: BaseException) -> int:
    """The HTTP status a failure answers with: its class's, 400 for another ValueError, else 500."""
    status = getattr(error, "status", None)
    if isinstance(status, int):
        return status
    return 400 if isinstance(error, ValueError) else 500


def kind_of(error: BaseException) -> str:
    """The protocol-neutral kind of a failure (see :func:`status_of`)."""
    kind = getattr(error, "kind", None)
    if isinstance(kind, str):
        return kind
    return "invalid_request" if isinstance(error, ValueError) else "api"
