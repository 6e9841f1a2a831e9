"""Anthropic-compatible endpoints: ``/messages`` (streamed and not) and ``/messages/count_tokens``."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from ..errors import ApiError
from ..images import from_base64, from_url
from ..request import ChatRequest, Image, Message, Text, ToolResult, ToolUse, structure, text
from ..streams import AsyncTextStream, Result
from ..structured import check_schema
from ..tools import CallPiece, Tool, ToolCall, check_count, make_tools, tool_parameters
from .adapter import Adapter, Answer, chat_handler
from .checks import checked, has_images, has_schemas
from .common import MODEL, POOL, REQUEST_ID, endpoint, field_of, refuse_fields, resolve_model, sampling
from .streaming import StreamShape

REFUSED = ("mcp_servers", "container")  # would change the answer and cannot be honoured: never ignored
NO_OPS = {"thinking": ({"type": "disabled"},)}  # asks for nothing: accepted
STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "cancelled": "end_turn", "timeout": "max_tokens",
               "tool_calls": "tool_use"}
MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")  # an image block's, as Anthropic's
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# kind of error -> Anthropic's error type
KINDS = {"invalid_request": "invalid_request_error", "authentication": "authentication_error",
         "not_found": "not_found_error", "no_response": "not_found_error", "no_previous_response": "not_found_error",
         "no_route": "not_found_error", "context_length": "invalid_request_error", "forbidden": "permission_error",
         "media_type": "invalid_request_error", "too_large": "invalid_request_error", "overloaded": "overloaded_error",
         "rate_limit": "rate_limit_error", "api": "api_error"}
# Anthropic's sampling fields -> GenParams'
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "stop_sequences": "stop",
          "max_tokens": "max_tokens", "speculative": "speculative"}


def error_body(error: ApiError) -> dict:
    return {"type": "error", "error": {"type": KINDS[error.kind], "message": error.message}}


ADAPTER = Adapter("anthropic", error_body, fields={"schema": "output_config.format.schema"},
                  statuses={"overloaded": 529},
                  context_message=lambda e: f"prompt is too long: {e.tokens} tokens > {e.limit} maximum")


def _block_text(block: Any, where: str) -> str:
    kind = block.get("type") if isinstance(block, dict) else type(block).__name__
    if kind != "text" or not isinstance(block.get("text"), str):
        raise ApiError(400, f"{where}: content blocks of type {str(kind)[:40]!r} are not supported here "
                       "(text only)", param=where)
    return block["text"]


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where} must be a string or an array of content blocks", param=where)
    return "".join(_block_text(block, f"{where}.{i}") for i, block in enumerate(content))


def _assistant(content: Any, where: str, calls: dict[str, str]) -> Message:
    """An assistant turn: its text blocks and its ``tool_use`` blocks."""
    if not isinstance(content, list):
        return text("assistant", _text(content, where))
    texts, uses = [], []
    for j, block in enumerate(content):
        at = f"{where}.{j}"
        if isinstance(block, dict) and block.get("type") == "tool_use":
            call_id, name, args = block.get("id"), block.get("name"), block.get("input", {})
            if not isinstance(call_id, str) or not call_id:
                raise ApiError(400, f"{at}.id must be a non-empty string", param=f"{at}.id")
            if not isinstance(name, str) or not NAME.match(name):
                raise ApiError(400, f"{at}.name must be 1 to 64 letters, digits, '_' or '-'", param=f"{at}.name")
            if not isinstance(args, dict):
                raise ApiError(400, f"{at}.input must be an object", param=f"{at}.input")
            calls[call_id] = name
            uses.append(ToolUse(call_id, name, json.dumps(args, ensure_ascii=False)))
        else:
            texts.append(_block_text(block, at))
    return Message("assistant", (Text("".join(texts)), *uses))


def _image(block: dict, where: str) -> Image:
    """An ``image`` block: its ``base64`` source, or a ``url`` one (downloaded only where the server allows)."""
    source = block.get("source")
    if not isinstance(source, dict):
        source = {}
    kind = source.get("type")
    if kind == "base64":
        media_type = source.get("media_type")
        if media_type not in MEDIA_TYPES:
            raise ApiError(400, f"{where}.source.media_type must be one of {', '.join(MEDIA_TYPES)}",
                           param=f"{where}.source.media_type")
        return from_base64(source.get("data"), where)
    if kind == "url":
        return from_url(source.get("url"), where)
    raise ApiError(400, f"{where}.source must be a base64 or url image source", param=f"{where}.source")


def _user(content: Any, where: str, calls: dict[str, str]) -> list[Message]:
    """A user turn: its ``tool_result`` blocks as ``tool`` messages, in order with its text and images."""
    if not isinstance(content, list):
        return [text("user", _text(content, where))]
    out: list[Message] = []
    parts: list[Text | Image] = []
    for j, block in enumerate(content):
        at = f"{where}.{j}"
        if isinstance(block, dict) and block.get("type") == "image":
            parts.append(_image(block, at))
            continue
        if not (isinstance(block, dict) and block.get("type") == "tool_result"):
            parts.append(Text(_block_text(block, at)))
            continue
        if parts:
            out.append(Message("user", tuple(parts)))
            parts = []
        call_id = block.get("tool_use_id")
        if not isinstance(call_id, str) or call_id not in calls:
            raise ApiError(400, f"{at}.tool_use_id: no earlier tool_use block has the id {str(call_id)[:70]!r}",
                           param=f"{at}.tool_use_id")
        result = block.get("content", "")
        result = _text(result, f"{at}.content") if result is not None else ""
        is_error = block.get("is_error", False)
        if not isinstance(is_error, bool):
            raise ApiError(400, f"{at}.is_error must be a boolean", param=f"{at}.is_error")
        out.append(Message("tool", (ToolResult(call_id, f"Error: {result}" if is_error else result, calls[call_id]),)))
    if parts or not out:
        out.append(Message("user", tuple(parts) or (Text(""),)))
    return out


def _conversation(body: dict) -> list[Message]:
    messages = field_of(body, "messages", list, required=True)
    if not messages:
        raise ApiError(400, "messages: at least one message is required", param="messages")
    out = []
    system = body.get("system")
    if system is not None:
        out.append(text("system", _text(system, "system")))
    calls: dict[str, str] = {}  # tool_use id -> tool name, for the tool_result blocks that answer them
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            role = m.get("role") if isinstance(m, dict) else type(m).__name__
            raise ApiError(400, f"messages.{i}.role must be 'user' or 'assistant', got {str(role)[:40]!r}",
                           param=f"messages.{i}.role")
        where = f"messages.{i}.content"
        if m["role"] == "assistant":
            out.append(_assistant(m.get("content"), where, calls))
        else:
            out.extend(_user(m.get("content"), where, calls))
    return out


def _tools(body: dict) -> dict:
    """The request's tools, tool choice and schema (``output_config.format``)."""
    tools = field_of(body, "tools", list, default=[])
    check_count(tools, "tools")  # before any is checked: each costs a schema check
    out: list[Tool] = []
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise ApiError(400, f"{where} must be an object", param=where)
        if tool.get("type", "custom") not in ("custom", None):
            raise ApiError(400, f"{where}.type: the tool type {str(tool['type'])[:40]!r} is not supported: "
                           "only custom tools (name, description, input_schema) are", param=f"{where}.type")
        name = tool.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ApiError(400, f"{where}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$', "
                           f"got {str(name)[:70]!r}", param=f"{where}.name")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise ApiError(400, f"{where}.input_schema must be a JSON schema object", param=f"{where}.input_schema")
        description = tool.get("description")
        if description is not None and not isinstance(description, str):
            raise ApiError(400, f"{where}.description must be a string", param=f"{where}.description")
        out.append(Tool(name, description or "", tool_parameters(schema, f"{where}.input_schema"),
                        bool(tool.get("strict", False))))
    make_tools(out, "tools", index=".{}")  # at most MAX_TOOLS, each name once
    choice, parallel = _tool_choice(body, out)
    fmt = _output_format(body)
    return structure(out, choice, fmt, "output_config.format", parallel)


def _tool_choice(body: dict, tools: list[Tool]) -> tuple[str | None, bool]:
    """The tool choice (None: the default) and whether calls may come in parallel."""
    choice = field_of(body, "tool_choice", dict)
    if choice is None:
        return None, True
    kind = choice.get("type")
    if kind not in ("auto", "any", "tool", "none"):
        raise ApiError(400, f"tool_choice.type must be auto, any, tool or none, got {str(kind)[:40]!r}",
                       param="tool_choice.type")
    if kind in ("any", "tool") and not tools:
        raise ApiError(400, f"tool_choice {kind!r} needs 'tools'", param="tool_choice")
    if kind == "tool" and choice.get("name") not in [t.name for t in tools]:
        raise ApiError(400, f"tool_choice.name: {str(choice.get('name'))[:64]!r} is not the name of a tool "
                       "in 'tools'", param="tool_choice.name")
    parallel = choice.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        raise ApiError(400, "tool_choice.disable_parallel_tool_use must be a boolean",
                       param="tool_choice.disable_parallel_tool_use")
    if not tools:  # nothing to choose from: asks for nothing
        return None, not parallel
    return {"any": "required", "tool": choice.get("name")}.get(kind, kind), not parallel


def _output_format(body: dict) -> dict | None:
    """The JSON schema of ``output_config.format`` (or the beta's top-level ``output_format``), if any."""
    config = field_of(body, "output_config", dict, default={})
    for name in config:
        if name not in ("format", "effort"):
            raise ApiError(400, f"output_config.{str(name)[:40]}: not supported", param=f"output_config.{name}")
    if config.get("effort") not in (None, "high"):
        raise ApiError(400, "output_config.effort other than 'high' is not supported", param="output_config.effort")
    fmt, where = config.get("format"), "output_config.format"
    if body.get("output_format") is not None:
        if fmt is not None:
            raise ApiError(400, "give output_config.format or output_format, not both", param="output_format")
        fmt, where = body["output_format"], "output_format"
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise ApiError(400, f"{where}.type must be 'json_schema'", param=f"{where}.type")
    if not isinstance(fmt.get("schema"), dict):
        raise ApiError(400, f"{where}.schema must be a JSON schema object", param=f"{where}.schema")
    return check_schema(fmt["schema"], f"{where}.schema")


def _request(body: dict) -> ChatRequest:
    refuse_fields(body, REFUSED, NO_OPS)
    temperature = field_of(body, "temperature", (int, float))
    if temperature is not None and not 0 <= temperature <= 1:
        raise ApiError(400, f"temperature: must be in [0, 1], got {temperature}", param="temperature")
    stops = field_of(body, "stop_sequences", list)
    if stops is not None and not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop_sequences must be a list of non-empty strings", param="stop_sequences")
    max_tokens = field_of(body, "max_tokens", int, required=True)
    if max_tokens <= 0:
        raise ApiError(400, f"max_tokens: must be at least 1, got {max_tokens}", param="max_tokens")
    params = sampling({**body, "stop_sequences": stops or None}, FIELDS)
    tools = _tools(body)
    conversation = _conversation(body)
    if conversation[-1].role == "assistant":
        raise ApiError(400, "a final assistant message (prefill) is not supported yet", param="messages")
    return ChatRequest(tuple(conversation), params=params, **tools)


def _message(rid: str, model: str, text: str | None, result: Result | None = None, input_tokens: int = 0) -> dict:
    reason = STOP_REASON[result.finish_reason] if result else None
    if result is not None and result.stop is not None:
        reason = "stop_sequence"
    content: list[dict] = []
    if text is not None and (text or not (result and result.tool_calls)):
        content.append({"type": "text", "text": text})
    if result is not None:
        content += [_tool_use(call) for call in result.tool_calls or ()]
    return {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": result.stop if result else None,
        "usage": {"input_tokens": result.usage.prompt_tokens if result else input_tokens,
                  "output_tokens": result.usage.completion_tokens if result else 0},
    }


def _tool_use(call: ToolCall) -> dict:
    try:
        args = call.args
    except ValueError:  # only when generation stopped inside the call
        args = {}
    return {"type": "tool_use", "id": _tool_use_id(call.id), "name": call.name, "input": args}


def _tool_use_id(call_id: str) -> str:
    return call_id.replace("call_", "toolu_", 1)


def _shape(rid: str, model: str) -> StreamShape:
    """Text goes in a text block, each tool call in a ``tool_use`` block after it, its input as
    ``input_json_delta`` s as it is generated; a block opens when its first piece arrives, so a call
    alone is block 0, as Anthropic's own are."""
    index, open_kind = -1, None

    def close() -> list:
        nonlocal open_kind
        if open_kind is None:
            return []
        open_kind = None
        return [("content_block_stop", {"type": "content_block_stop", "index": index})]

    def open_block(block: dict) -> list:
        nonlocal index, open_kind
        events = close()
        index += 1
        open_kind = block["type"]
        ping = [("ping", {"type": "ping"})] if index == 0 else []  # after the first block's start, as Anthropic's
        return [*events, ("content_block_start", {"type": "content_block_start", "index": index,
                                                  "content_block": block}), *ping]

    def _delta(delta: dict) -> tuple:
        return ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})

    def start(s: AsyncTextStream) -> list:
        return [("message_start", {"type": "message_start", "message": _message(rid, model, None,
                                                                                input_tokens=s.prompt_tokens)})]

    def delta(text: str) -> list:
        events = open_block({"type": "text", "text": ""}) if open_kind != "text" else []
        return [*events, _delta({"type": "text_delta", "text": text})]

    def call_piece(piece: CallPiece) -> list:
        if not piece.arguments:  # the call's first piece: its block opens
            return open_block({"type": "tool_use", "id": _tool_use_id(piece.id), "name": piece.name, "input": {}})
        return [_delta({"type": "input_json_delta", "partial_json": piece.arguments})]

    def end(result: Result) -> list:
        final = _message(rid, model, None, result)
        events = open_block({"type": "text", "text": ""}) if index < 0 else []  # an empty answer: one empty block
        return events + close() + [
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": final["stop_reason"], "stop_sequence": final["stop_sequence"]},
                               "usage": {"input_tokens": result.usage.prompt_tokens,
                                         "output_tokens": result.usage.completion_tokens}}),
            ("message_stop", {"type": "message_stop"})]

    return StreamShape(
        start=start,
        delta=delta,
        call_piece=call_piece,
        tool_call=lambda call: close(),
        end=end,
        error=lambda error: [("error", error_body(error))],
    )


async def _parse(request: web.Request, body: dict, model: str, stream: bool) -> Answer:
    untrusted = has_schemas(body, "tools", "output_config", "output_format") or await has_images(body, "messages")
    chat_request = await checked(request, untrusted, _request, body)  # tools and schemas are checked there
    rid = "msg_" + request[REQUEST_ID]
    return Answer(chat_request, lambda result: _message(rid, model, result.text, result), _shape(rid, model))


messages = chat_handler(ADAPTER, _parse)


async def _count_tokens(request: web.Request, body: dict) -> web.Response:
    model = field_of(body, "model", str, required=True)
    request[MODEL] = model
    chat_request = await checked(request, has_schemas(body, "tools") or await has_images(body, "messages"),
                                 lambda: ChatRequest(tuple(_conversation(body)), **_tools(body)))
    name = await resolve_model(request, model)
    return web.json_response({"input_tokens": await request.app[POOL].acount_request_tokens(chat_request, name)})


count_tokens = endpoint(ADAPTER, _count_tokens)
