"""``/models`` and ``/models/{id}``: what a client may name, in OpenAI's shape or, when the request
carries ``anthropic-version``, in Anthropic's."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from aiohttp import web

from .. import store
from ..demo import DEMO_NAME
from .common import MAX_NAME, OPTIONS, POOL, ApiError


async def _servable(request: web.Request) -> list[dict]:
    """Every name the server accepts: loaded models and their aliases, the app's aliases, then
    models of the store and the Hugging Face cache that load on first use."""
    pool, options = request.app[POOL], request.app[OPTIONS]
    out: dict[str, dict] = {}

    def add(name: str, **info: object) -> None:
        out.setdefault(name, {"id": name, **info})

    for m in pool.models():
        for name in filter(None, (m.alias, m.name)):
            add(name, created=int(m.last_used), loaded=True, state=m.state, size_bytes=m.size_bytes)
    local = await asyncio.get_running_loop().run_in_executor(None, store.list_local_models)
    if DEMO_NAME in out or any(m.name == DEMO_NAME for m in local):
        add("demo", created=0, loaded=DEMO_NAME in out, state="alias", size_bytes=None)
    for alias, target in options.aliases.items():
        if target in out or any(m.name == target for m in local):
            add(alias, created=0, loaded=target in out, state="alias", size_bytes=None)
    if options.auto_load:
        for entry in local:
            add(entry.name, created=0, loaded=False, state="available", size_bytes=entry.size_bytes)
    return list(out.values())


def _openai(m: dict) -> dict:
    return {"id": m["id"], "object": "model", "created": m["created"], "owned_by": "local", "state": m["state"],
            "size_bytes": m["size_bytes"], "loaded": m["loaded"]}


def _anthropic(m: dict) -> dict:
    created = datetime.fromtimestamp(m["created"], timezone.utc).isoformat().replace("+00:00", "Z")
    return {"type": "model", "id": m["id"], "display_name": m["id"], "created_at": created}


async def models(request: web.Request, body: dict) -> web.Response:
    """Loaded models first, then the aliases and local models that load on first use."""
    found = await _servable(request)
    if "anthropic-version" in request.headers:
        data = [_anthropic(m) for m in found]
        return web.json_response({"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None})
    return web.json_response({"object": "list", "data": [_openai(m) for m in found]})


async def model(request: web.Request, body: dict) -> web.Response:
    """One model by the name a client would send."""
    name = request.match_info["id"]
    found = {m["id"]: m for m in await _servable(request)}
    if name not in found:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise ApiError(404, f"The model {shown!r} does not exist or cannot be served. "
                       f"Available: {', '.join(found) or 'none'}.", "not_found", "model")
    m = found[name[:MAX_NAME]]
    return web.json_response(_anthropic(m) if "anthropic-version" in request.headers else _openai(m))
