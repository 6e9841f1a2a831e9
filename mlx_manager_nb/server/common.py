"""What every protocol's endpoints share: request ids, auth, JSON bodies, errors, stats, model names.

Every endpoint is wrapped by :func:`endpoint`, which turns any failure into the protocol's own
error shape, records refused requests in the audit log, and echoes ``x-request-id``.
"""

from __future__ import annotations

import hmac
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..audit_log import new_request_id
from ..errors import InvalidModelError, ModelNotFoundError, PoolFullError

POOL = web.AppKey("pool", object)
OPTIONS = web.AppKey("options", object)
STATS = web.AppKey("stats", object)
REQUEST_ID = web.RequestKey("request_id", str)
MODEL = web.RequestKey("model", str)  # the model a request named, for its audit row


class ApiError(Exception):
    """A failure with an HTTP status and the protocol-neutral kind of error it is."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request", param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers or {}


# error kind -> (OpenAI type, OpenAI code, Anthropic type)
KINDS = {
    "invalid_request": ("invalid_request_error", None, "invalid_request_error"),
    "authentication": ("invalid_request_error", "invalid_api_key", "authentication_error"),
    "not_found": ("invalid_request_error", "model_not_found", "not_found_error"),
    "too_large": ("invalid_request_error", "request_too_large", "request_too_large"),
    "overloaded": ("server_error", "overloaded", "overloaded_error"),
    "api": ("server_error", None, "api_error"),
}


def error_body(protocol: str, error: ApiError) -> dict:
    openai_type, code, anthropic_type = KINDS[error.kind]
    if protocol == "anthropic":
        return {"type": "error", "error": {"type": anthropic_type, "message": error.message}}
    return {"error": {"message": error.message, "type": openai_type, "param": error.param, "code": code}}


@dataclass
class Options:
    """Settings of one app: who may call it and how models are found."""

    api_key: str | None = None
    auto_load: bool = True
    aliases: dict[str, str] = field(default_factory=dict)
    audit: Any = None  # where this app's requests are recorded instead of the pool's log


@dataclass
class Stats:
    """Live counters of one app, for the server handle and the server panel."""

    requests: int = 0
    active_streams: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=256))  # (end time, tokens, seconds)

    def finished(self, tokens: int, seconds: float) -> None:
        self.recent.append((time.monotonic(), tokens, seconds))

    def tokens_per_second(self, window: float = 30.0) -> float:
        now = time.monotonic()
        done = [(t, n, s) for t, n, s in self.recent if now - t <= window]
        busy = sum(s for _, _, s in done)
        return sum(n for _, n, _ in done) / busy if busy > 0 else 0.0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "active_streams": self.active_streams,
                "tokens_per_second": round(self.tokens_per_second(), 2)}


def check_api_key(request: web.Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "Invalid or missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY').",
                       "authentication")


async def json_body(request: web.Request) -> dict:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise ApiError(413, f"Request body too large: {e.text}", "too_large") from None
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"Request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object")
    return body


def field_of(body: dict, name: str, kinds: type | tuple, required: bool = False, default: Any = None) -> Any:
    """Read one field, checking its JSON type; a wrong or missing field is a 400 naming it."""
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"'{name}' is required", param=name)
        return default
    value = body[name]
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds)):
        names = "/".join(k.__name__ for k in _tuple(kinds))
        raise ApiError(400, f"'{name}' must be of type {names}, got {type(value).__name__}", param=name)
    return value


def _tuple(kinds: type | tuple) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


async def resolve_model(request: web.Request, name: str) -> str:
    """Map a client's model name to a loaded model, loading a local one on first use."""
    pool, options = request.app[POOL], request.app[OPTIONS]
    name = options.aliases.get(name, name)
    if pool.is_loaded(name):
        return name
    if options.auto_load:
        try:
            await pool.aload(name)
            return name
        except ModelNotFoundError:
            pass
        except InvalidModelError as e:
            raise ApiError(400, str(e), param="model") from None
    raise ApiError(404, f"The model '{name}' does not exist or is not loaded. Loaded: "
                   f"{', '.join(m.alias or m.name for m in pool.models()) or 'none'}.", "not_found", "model")


def audit_meta(request: web.Request, protocol: str, stream: bool) -> dict:
    return {
        "id": request[REQUEST_ID],
        "source": "http",
        "endpoint": request.path,
        "protocol": protocol,
        "stream": stream,
        "client": request.remote,
        "user_agent": request.headers.get("user-agent"),
        "http_status": 200,
        "audit": request.app[OPTIONS].audit,
    }


Handler = Callable[[web.Request, dict], Awaitable[web.StreamResponse]]


def endpoint(protocol: str, handler: Handler, body: bool = True) -> Callable[[web.Request], Awaitable]:
    """Wrap a handler: request id, API key, JSON body, and every error in the protocol's shape."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        request[REQUEST_ID] = request.headers.get("x-request-id") or new_request_id()
        try:
            check_api_key(request, request.app[OPTIONS].api_key)
            response = await handler(request, await json_body(request) if body else {})
        except Exception as e:
            response = _error_response(request, protocol, e)
        response.headers["x-request-id"] = request[REQUEST_ID]
        return response

    return wrapped


def _error_response(request: web.Request, protocol: str, e: Exception) -> web.Response:
    if isinstance(e, ApiError):
        error = e
    elif isinstance(e, ValueError):
        error = ApiError(400, str(e))
    elif isinstance(e, ModelNotFoundError):
        error = ApiError(404, str(e), "not_found", "model")
    elif isinstance(e, PoolFullError):
        status = 529 if protocol == "anthropic" else 503
        error = ApiError(status, f"{e} Retry later.", "overloaded", headers={"retry-after": "5"})
    else:
        error = ApiError(500, f"Internal error: {type(e).__name__}: {e}", "api")
    meta = dict(audit_meta(request, protocol, False), http_status=error.status)
    request.app[POOL].record_refused(e, request.get(MODEL), meta)
    return web.json_response(error_body(protocol, error), status=error.status, headers=error.headers)
