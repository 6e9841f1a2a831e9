"""Anthropic-compatible endpoints: ``/messages`` (streamed and not) and ``/messages/count_tokens``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..streams import AsyncTextStream, Result
from .common import MODEL, POOL, REQUEST_ID, ApiError, audit_meta, field_of, resolve_model
from .streaming import StreamShape, respond

REFUSED = ("mcp_servers", "container")  # would change the answer and cannot be honoured: never ignored
NO_OPS = {"thinking": ({"type": "disabled"},), "tool_choice": ({"type": "none"},)}  # ask for nothing: accepted
STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "cancelled": "end_turn", "timeout": "max_tokens"}


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or an array of content blocks", param=where)
    parts = []
    for i, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else type(block).__name__
        if kind != "text" or not isinstance(block.get("text"), str):
            raise ApiError(400, f"{where}[{i}]: content blocks of type {str(kind)[:40]!r} are not supported yet "
                           "(text only)", param=where)
        parts.append(block["text"])
    return "".join(parts)


def _conversation(body: dict) -> list[dict]:
    messages = field_of(body, "messages", list, required=True)
    if not messages:
        raise ApiError(400, "messages: at least one message is required", param="messages")
    out = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _text(system, "system")})
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            role = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise ApiError(400, f"messages[{i}].role must be 'user' or 'assistant', got {str(role)[:40]!r}",
                           param=f"messages.{i}.role")
        out.append({"role": m["role"], "content": _text(m.get("content"), f"messages.{i}.content")})
    return out


def _params(body: dict) -> dict:
    for name in REFUSED:
        if body.get(name):
            raise ApiError(400, f"'{name}' is not supported yet", param=name)
    for name, accepted in NO_OPS.items():
        if body.get(name) is not None and body[name] not in accepted:
            raise ApiError(400, f"'{name}' other than {' or '.join(map(repr, accepted))} is not supported yet",
                           param=name)
    if body.get("tools") and body.get("tool_choice") != {"type": "none"}:
        raise ApiError(400, "'tools' are not supported yet", param="tools")
    temperature = field_of(body, "temperature", (int, float))
    if temperature is not None and not 0 <= temperature <= 1:
        raise ApiError(400, f"temperature: must be in [0, 1], got {temperature}", param="temperature")
    stops = field_of(body, "stop_sequences", list)
    if stops is not None and not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop_sequences must be a list of non-empty strings", param="stop_sequences")
    max_tokens = field_of(body, "max_tokens", int, required=True)
    if max_tokens <= 0:
        raise ApiError(400, f"max_tokens: must be at least 1, got {max_tokens}", param="max_tokens")
    return {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": field_of(body, "top_p", (int, float)),
        "top_k": field_of(body, "top_k", int),
        "stop": stops or None,
    }


def _message(rid: str, model: str, text: str | None, result: Result | None = None, input_tokens: int = 0) -> dict:
    reason = STOP_REASON[result.finish_reason] if result else None
    if result is not None and result.stop is not None:
        reason = "stop_sequence"
    return {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}] if text is not None else [],
        "stop_reason": reason,
        "stop_sequence": result.stop if result else None,
        "usage": {"input_tokens": result.usage.prompt_tokens if result else input_tokens,
                  "output_tokens": result.usage.completion_tokens if result else 0},
    }


def _shape(rid: str, model: str) -> StreamShape:
    def start(s: AsyncTextStream) -> list:
        return [("message_start", {"type": "message_start", "message": _message(rid, model, None,
                                                                                input_tokens=s.prompt_tokens)}),
                ("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}}),
                ("ping", {"type": "ping"})]

    def end(result: Result) -> list:
        final = _message(rid, model, None, result)
        return [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                ("message_delta", {"type": "message_delta",
                                   "delta": {"stop_reason": final["stop_reason"],
                                             "stop_sequence": final["stop_sequence"]},
                                   "usage": {"input_tokens": result.usage.prompt_tokens,
                                             "output_tokens": result.usage.completion_tokens}}),
                ("message_stop", {"type": "message_stop"})]

    return StreamShape(
        protocol="anthropic",
        start=start,
        delta=lambda text: [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                     "delta": {"type": "text_delta", "text": text}})],
        end=end,
        error=lambda e: [("error", {"type": "error", "error": {"type": "api_error", "message": str(e)}})],
    )


async def messages(request: web.Request, body: dict) -> web.StreamResponse:
    model = field_of(body, "model", str, required=True)
    request[MODEL] = model
    stream = field_of(body, "stream", bool, default=False)
    params = _params(body)
    conversation = _conversation(body)
    if conversation[-1]["role"] == "assistant":
        raise ApiError(400, "a final assistant message (prefill) is not supported yet", param="messages")
    name = await resolve_model(request, model)
    pool = request.app[POOL]
    meta = audit_meta(request, "anthropic", stream)
    rid = "msg_" + request[REQUEST_ID]
    return await respond(
        request, lambda: pool.achat(conversation, model=name, stream=True, meta=meta, **params), stream,
        lambda result: _message(rid, model, result.text, result), _shape(rid, model),
    )


async def count_tokens(request: web.Request, body: dict) -> web.Response:
    model = field_of(body, "model", str, required=True)
    request[MODEL] = model
    conversation = _conversation(body)
    name = await resolve_model(request, model)
    return web.json_response({"input_tokens": await request.app[POOL].acount_tokens(conversation, model=name)})
