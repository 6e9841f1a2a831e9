"""``/models`` and ``/models/{id}``: what a client may name, in OpenAI's shape or, when the request
carries ``anthropic-version``, in Anthropic's."""

from __future__ import annotations

from datetime import datetime, timezone

from aiohttp import web

from .common import MAX_NAME, ApiError, servable_models


def _openai(m: dict) -> dict:
    return {"id": m["id"], "object": "model", "created": m["created"], "owned_by": "local", "root": m["root"],
            "state": m["state"], "size_bytes": m["size_bytes"], "loaded": m["loaded"]}


def _anthropic(m: dict) -> dict:
    created = datetime.fromtimestamp(m["created"], timezone.utc).isoformat().replace("+00:00", "Z")
    return {"type": "model", "id": m["id"], "display_name": m["id"], "created_at": created, "lifecycle": "active"}


async def models(request: web.Request, body: dict) -> web.Response:
    """Loaded models first, then the aliases and local models that load on first use."""
    found = await servable_models(request)
    if "anthropic-version" in request.headers:
        data = [_anthropic(m) for m in found]
        return web.json_response({"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None})
    return web.json_response({"object": "list", "data": [_openai(m) for m in found]})


async def model(request: web.Request, body: dict) -> web.Response:
    """One model by the name a client would send."""
    name = request.match_info["id"]
    found = {m["id"]: m for m in await servable_models(request)}
    if name not in found:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise ApiError(404, f"The model {shown!r} does not exist or cannot be served. "
                       f"Available: {', '.join(found) or 'none'}.", "not_found", "model")
    m = found[name[:MAX_NAME]]
    return web.json_response(_anthropic(m) if "anthropic-version" in request.headers else _openai(m))
