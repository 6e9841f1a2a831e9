"""OpenAI-compatible ``/embeddings``: strings or token ids in, float or base64 vectors out."""

from __future__ import annotations

import base64

import numpy as np
from aiohttp import web

from .. import embeddings as emb
from .common import AUDITED, MODEL, POOL, STATS, ApiError, field_of, http_context, resolve_model

FORMATS = ("float", "base64")


def _encode(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":  # as OpenAI: the raw little-endian float32 bytes
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


async def embeddings(request: web.Request, body: dict) -> web.Response:
    """Embed ``input`` (a string, strings, token ids or lists of token ids) with an embedding model.

    Inputs over the model's length limit are refused (400), as OpenAI does.
    """
    model = field_of(body, "model", str, required=True)
    request[MODEL] = model
    inputs = field_of(body, "input", (str, list), required=True)
    fmt = field_of(body, "encoding_format", str, default="float")
    if fmt not in FORMATS:
        raise ApiError(400, f"'encoding_format' must be one of {', '.join(FORMATS)}, got {fmt!r}",
                       param="encoding_format")
    dimensions = field_of(body, "dimensions", int)
    field_of(body, "user", str)
    name = await resolve_model(request, model)
    request.app[STATS].requests += 1
    request[AUDITED] = True  # from here on the pool records the request, refused or not
    done = await emb.arun(request.app[POOL], inputs, name, dimensions=dimensions,
                          meta=http_context(request, "openai", False))
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, fmt)} for i, v in enumerate(done.vectors)]
    usage = {"prompt_tokens": done.prompt_tokens, "total_tokens": done.prompt_tokens}
    return web.json_response({"object": "list", "data": data, "model": model, "usage": usage})
