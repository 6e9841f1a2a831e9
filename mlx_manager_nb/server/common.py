"""What every protocol's endpoints share: request ids, auth, JSON bodies, errors, stats, model names.

Every endpoint is wrapped by :func:`endpoint`, which turns any failure into the protocol's own
error shape (see :class:`~.adapter.Adapter`), records refused requests in the audit log, and
echoes ``x-request-id``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from .. import store
from ..audit_log import new_request_id
from ..errors import ApiError, InvalidModelError, ModelNotFoundError
from ..params import JSON_TYPES, GenParams, make_params
from ..request import HTTP_PRIORITY, RequestContext

if TYPE_CHECKING:
    from ..model_pool import Pool
    from ..response_store import ResponseStore
    from ..streams import AsyncTextStream
    from .adapter import Adapter
    from .limits import Limits

POOL: web.AppKey[Pool] = web.AppKey("pool")
RESPONSES: web.AppKey[ResponseStore | None] = web.AppKey("responses")  # None: responses are not stored
LIMITS: web.AppKey[Limits] = web.AppKey("limits")
REQUEST_ID = web.RequestKey("request_id", str)  # generated here: the audit row's id
CLIENT_ID = web.RequestKey("client_id", object)  # the client's x-request-id, if usable
MODEL = web.RequestKey("model", str)  # the model a request named, for its audit row
AUDITED = web.RequestKey("audited", bool)  # the pool recorded this request (it reached the pool)
STREAM = web.RequestKey("stream", bool)  # the request asked for a stream, for its audit row

MAX_NAME = 256  # characters of a model name or client request id
PARSE_OFF_LOOP = 64 * 1024  # bodies larger than this are parsed on a worker thread
PRINTABLE_ID = re.compile(r"^[\x21-\x7e]{1,128}$")

T = TypeVar("T")


@dataclass
class Options:
    """Settings of one app: who may call it and how models are found."""

    api_key: str | None = None
    auto_load: bool = True
    aliases: dict[str, str] = field(default_factory=dict)
    audit: Any = None  # where this app's requests are recorded instead of the pool's log
    allow_downloads: bool = False  # may a request fetch a model (the demo wheel, a hub repo)?
    allow_image_urls: bool = False  # may a request's image be an http(s) URL the server downloads?


@dataclass
class Stats:
    """Live counters of one app, for the server handle and the server panel."""

    requests: int = 0
    active_streams: int = 0
    in_flight: int = 0  # requests on the pool now, streamed or not
    streams: set[AsyncTextStream] = field(default_factory=set)  # their streams, to cancel at shutdown
    # (end time, tokens, seconds) of the latest requests
    recent: deque[tuple[float, int, float]] = field(default_factory=lambda: deque(maxlen=256))

    def finished(self, tokens: int, seconds: float) -> None:
        self.recent.append((time.monotonic(), tokens, seconds))

    def tokens_per_second(self, window: float = 30.0) -> float:
        now = time.monotonic()
        done = [(t, n, s) for t, n, s in self.recent if now - t <= window]
        busy = sum(s for _, _, s in done)
        return sum(n for _, n, _ in done) / busy if busy > 0 else 0.0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "active_streams": self.active_streams, "in_flight": self.in_flight,
                "tokens_per_second": round(self.tokens_per_second(), 2)}


OPTIONS = web.AppKey("options", Options)
STATS = web.AppKey("stats", Stats)


def check_api_key(request: web.Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    # header bytes that are not UTF-8 arrive as surrogate escapes: compare bytes, never fail on them
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), api_key.encode()):
        raise ApiError(401, "Invalid or missing API key (send 'Authorization: Bearer KEY' or 'x-api-key: KEY').",
                       "authentication")


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine's loopback (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _bad_string(value: Any) -> str | None:
    """The path of the first string (key or value) in ``value`` that is not valid Unicode, or None."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(v, dict):
            for k, item in v.items():
                stack.append((f"{path}.{k}" if path else str(k), k))
                stack.append((f"{path}.{k}" if path else str(k), item))
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(v))
    return None


def parse_json(raw: bytes) -> dict:
    """Parse a request body: a JSON object of valid Unicode, without NaN or Infinity."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "Request body is nested too deeply") from None
    except ValueError as e:
        raise ApiError(400, f"Request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "Request body must be a JSON object")
    bad = _bad_string(body)
    if bad is not None:
        raise ApiError(400, f"'{bad}' is not valid Unicode text (it holds a lone surrogate)", param=bad)
    return body


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a worker thread: work that grows with the request (parsing, schema checks)
    never holds the event loop, and so every other request, while it runs."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def json_body(request: web.Request) -> dict:
    """The request's JSON object; a large body is parsed off the event loop."""
    if request.content_type != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {request.content_type or 'none'!r}",
                       "media_type")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise ApiError(413, f"Request body too large: {e.text}", "too_large") from None
    if len(raw) > PARSE_OFF_LOOP:
        return await off_loop(parse_json, raw)
    return parse_json(raw)


def refuse_fields(body: dict, refused: tuple[str, ...], no_ops: dict[str, tuple]) -> None:
    """Fields that would change the answer and cannot be honoured are a 400 naming them, never ignored
    (an empty object too: ``web_search_options: {}`` asks for web search); ``no_ops`` maps a field to
    the values that ask for nothing, which are accepted."""
    for name in refused:
        if body.get(name) not in (None, False, []):
            raise ApiError(400, f"'{name}' is not supported yet", param=name)
    for name, accepted in no_ops.items():
        if body.get(name) is not None and body[name] not in accepted:
            raise ApiError(400, f"'{name}' other than {' or '.join(map(repr, accepted))} is not supported yet",
                           param=name)


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
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number, got {value}", param=name)
    return value


def sampling(body: dict, fields: Mapping[str, str], **given: Any) -> GenParams:
    """The sampler's parameters in a body: ``fields`` maps each field of the protocol to the
    :class:`~mlx_manager_nb.params.GenParams` field it sets (``{"stop_sequences": "stop"}``), ``given``
    holds those read (and checked) otherwise. A bad value is a 400 naming the protocol's field."""
    values = {param: field_of(body, name, JSON_TYPES[param]) for name, param in fields.items()}
    return make_params({param: name for name, param in fields.items()}, **{**values, **given})


def _tuple(kinds: type | tuple) -> tuple:
    return kinds if isinstance(kinds, tuple) else (kinds,)


async def servable_models(request: web.Request) -> list[dict]:
    """Every name a client may use, the one rule for listing and for loading on first use: loaded
    models and their aliases, the app's aliases, then (with auto-load) models of the store and the
    local Hugging Face cache. Never a path or a GGUF file. Each name's ``root`` is the model it
    serves (as vLLM lists it), so a client can tell an alias from another model."""
    pool, options = request.app[POOL], request.app[OPTIONS]
    out: dict[str, dict] = {}

    def add(name: str, **info: object) -> None:
        out.setdefault(name, {"id": name, **info})

    for m in pool.models():
        for name in filter(None, (m.alias, m.name)):
            add(name, root=m.name, created=int(m.last_used), loaded=True, state=m.state, size_bytes=m.size_bytes)
    local = await off_loop(store.list_local_models)

    def servable(target: str) -> bool:  # without auto-load, only what is loaded
        return target in out or (options.auto_load and any(m.name == target for m in local))

    def add_alias(alias: str, target: str) -> None:
        if servable(target):
            root = out[target]["root"] if target in out else target
            add(alias, root=root, created=0, loaded=target in out, state="alias", size_bytes=None)

    for reference, named in store.named().items():  # "demo": the name of the demo model's folder
        add_alias(reference, named.folder)
    for alias, target in options.aliases.items():
        add_alias(alias, target)
    if options.auto_load:
        for entry in local:
            add(entry.name, root=entry.name, created=0, loaded=False, state="available", size_bytes=entry.size_bytes)
    return list(out.values())


async def resolve_model(request: web.Request, name: str) -> str:
    """Map a client's model name to a loaded model, loading a servable one on first use; nothing is
    downloaded unless the server was started with ``allow_downloads=True``."""
    pool, options = request.app[POOL], request.app[OPTIONS]
    name = options.aliases.get(name, name)
    if len(name) <= MAX_NAME and pool.is_loaded(name):  # the pool's resolver: names, aliases, "demo"
        return name
    servable = await servable_models(request)
    known = any(m["id"] == name for m in servable)
    fetchable = options.allow_downloads and (name in store.named() or store.REPO_ID.match(name) is not None)
    if options.auto_load and len(name) <= MAX_NAME and (known or fetchable):
        try:
            await pool.aload(name, auto_loaded=True)  # evicts only models loaded this way
            return name
        except ModelNotFoundError:
            pass
        except InvalidModelError as e:
            raise ApiError(400, str(e), param="model") from None
    loaded = [m.alias or m.name for m in pool.models() if m.state == "ready"]
    others = [m["id"] for m in servable if not m["loaded"]]
    shown = name if len(name) <= 80 else name[:77] + "..."
    raise ApiError(404, f"The model {shown!r} does not exist or cannot be served. Loaded: "
                   f"{', '.join(loaded) or 'none'}; available to load: {', '.join(others) or 'none'}.",
                   "not_found", "model")


def http_context(request: web.Request, protocol: str, stream: bool, http_status: int = 200) -> RequestContext:
    """What the pool records about an HTTP request (a failure records the status it answers with)."""
    return RequestContext(source="http", endpoint=request.path, protocol=protocol, stream=stream,
                          id=request[REQUEST_ID], client_request_id=request.get(CLIENT_ID), client=request.remote,
                          user_agent=request.headers.get("user-agent"), http_status=http_status,
                          audit=request.app[OPTIONS].audit, priority=HTTP_PRIORITY)


Handler = Callable[[web.Request, dict], Awaitable[web.StreamResponse]]


def endpoint(adapter: Adapter, handler: Handler, body: bool = True,
             alternative: Adapter | None = None) -> Callable[[web.Request], Awaitable]:
    """Wrap a handler: request ids, API key, the client's request limit, JSON body, and every error in
    the adapter's shape (``alternative``'s when the request carries ``anthropic-version``, as the
    Anthropic SDK's do)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        chosen = alternative if alternative is not None and "anthropic-version" in request.headers else adapter
        request[REQUEST_ID] = new_request_id()
        client_id = request.headers.get("x-request-id")
        request[CLIENT_ID] = client_id[:MAX_NAME] if client_id else None
        try:
            check_api_key(request, request.app[OPTIONS].api_key)
            with request.app[LIMITS].client_slot(request):
                response = await handler(request, await json_body(request) if body else {})
        except Exception as e:
            response = _error_response(request, chosen, e)
        if not response.prepared:  # a stream has sent its headers already
            response.headers.update(id_headers(request, chosen.name))
        return response

    return wrapped


def id_headers(request: web.Request, protocol: str) -> dict[str, str]:
    """``x-request-id`` (the client's, when printable, else ours) and Anthropic's ``request-id``."""
    client_id = request.get(CLIENT_ID)
    echoed = client_id if isinstance(client_id, str) and PRINTABLE_ID.match(client_id) else request[REQUEST_ID]
    return {"x-request-id": echoed, **({"request-id": request[REQUEST_ID]} if protocol == "anthropic" else {})}


def _error_response(request: web.Request, adapter: Adapter, e: Exception) -> web.Response:
    error = adapter.error(e)
    if not request.get(AUDITED):
        context = http_context(request, adapter.name, request.get(STREAM, False), http_status=error.status)
        request.app[POOL].record_refused(e, request.get(MODEL), context, answered=True)
    return web.json_response(adapter.error_body(error), status=error.status, headers=error.headers)
