"""The aiohttp applications: the ``/v1`` endpoints over a pool, and the root app that mounts them.

``create_app(pool)`` returns the endpoints without a prefix of its own, to mount in another app:
``parent.add_subapp("/v1", create_app(pool))``.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import anthropic_api, openai_api
from .common import OPTIONS, POOL, STATS, Options, Stats, endpoint

V1 = web.AppKey("v1", web.Application)
MAX_BODY = 8 * 2**20
CORS_HEADERS = "authorization, content-type, x-api-key, anthropic-version, anthropic-beta, x-request-id"


def create_app(pool: Any, audit: Any = None, *, api_key: str | None = None, auto_load: bool = True,
               aliases: dict[str, str] | None = None, max_body: int = MAX_BODY) -> web.Application:
    """The /v1 endpoints as an app with no prefix of its own, over ``pool`` (shared with the notebook).

    ``audit`` overrides where this app's requests are recorded (default: the pool's audit log).
    ``aliases`` maps names clients send (``"gpt-4o-mini"``) to loaded models. The app neither loads
    nor unloads models on startup or cleanup; ``auto_load`` loads a local model on its first request.
    Mounted in a parent app, the parent's ``client_max_size`` bounds request bodies.
    """
    app = web.Application(client_max_size=max_body)
    app[POOL] = pool
    app[OPTIONS] = Options(api_key=api_key, auto_load=auto_load, aliases=dict(aliases or {}), audit=audit)
    app[STATS] = Stats()
    app.router.add_get("/models", endpoint("openai", openai_api.models, body=False))
    app.router.add_post("/chat/completions", endpoint("openai", openai_api.chat_completions))
    app.router.add_post("/completions", endpoint("openai", openai_api.completions))
    app.router.add_post("/messages", endpoint("anthropic", anthropic_api.messages))
    app.router.add_post("/messages/count_tokens", endpoint("anthropic", anthropic_api.count_tokens))
    return app


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
                "access-control-allow-methods": "GET, POST, OPTIONS",
                "access-control-allow-headers": CORS_HEADERS,
                "access-control-expose-headers": "x-request-id",
                "vary": "origin",
            })

    return preflight, add_headers


async def _health(request: web.Request) -> web.Response:
    health = request.app[V1][POOL].health()
    return web.json_response(dict(health, status="ok" if health["engine"] != "dead" else "error"),
                             status=200 if health["engine"] != "dead" else 503)


def root_app(v1: web.Application, cors_origins: tuple[str, ...], max_body: int) -> web.Application:
    """The served application: ``v1`` under ``/v1``, ``/health``, and CORS for the listed origins."""
    preflight, add_headers = _cors(cors_origins)
    root = web.Application(middlewares=[preflight] if cors_origins else [], client_max_size=max_body)
    if cors_origins:
        root.on_response_prepare.append(add_headers)
    root[V1] = v1
    root.add_subapp("/v1", v1)
    root.router.add_get("/health", _health)
    return root
