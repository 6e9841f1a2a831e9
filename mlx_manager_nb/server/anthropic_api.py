"""Anthropic-compatible endpoints: ``/messages`` (streamed and not) and ``/messages/count_tokens``."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from ..errors import ContextLengthError, InvalidParameterError
from ..streams import AsyncTextStream, Result
from ..tools import CallPiece, ToolCall
from .common import MODEL, POOL, REQUEST_ID, ApiError, api_error, audit_meta, field_of, refuse_fields, resolve_model
from .streaming import StreamShape, respond

REFUSED = ("mcp_servers", "container")  # would change the answer and cannot be honoured: never ignored
NO_OPS = {"thinking": ({"type": "disabled"},)}  # asks for nothing: accepted
STOP_REASON = {"stop": "end_turn", "length": "max_tokens", "cancelled": "end_turn", "timeout": "max_tokens",
               "tool_calls": "tool_use"}
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# the pool's parameter (or its prefix) -> this API's field
POOL_NAMES = {"stop": "stop_sequences", "response_format.json_schema.schema": "output_config.format.schema",
              "response_format.json_schema": "output_config.format", "response_format": "output_config.format",
              "messages": "messages", "parallel_tool_calls": "tool_choice.disable_parallel_tool_use"}
POOL_TOOL = re.compile(r"^tools\[(\d+)\](?:\.function)?(\.parameters|\.name|\.description|\.type)?")


def _field(param: str) -> str:
    """This API's name for a field the pool named in its own (OpenAI chat) terms."""
    m = POOL_TOOL.match(param)
    if m:
        rest = {".parameters": ".input_schema", None: ""}.get(m.group(2), m.group(2))
        return f"tools.{m.group(1)}{rest}{param[m.end():]}"
    for pool_name, name in POOL_NAMES.items():
        if param == pool_name or param.startswith((pool_name + ".", pool_name + "[")):
            return name  # message indexes differ (tool results are messages of their own): name the field
    return param


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


def _assistant(content: Any, where: str, calls: dict[str, str]) -> dict:
    """An assistant turn: its text blocks, and its ``tool_use`` blocks as OpenAI ``tool_calls``."""
    if not isinstance(content, list):
        return {"role": "assistant", "content": _text(content, where)}
    text, tool_calls = [], []
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
            tool_calls.append({"id": call_id, "type": "function",
                               "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
        else:
            text.append(_block_text(block, at))
    message: dict = {"role": "assistant", "content": "".join(text)}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _user(content: Any, where: str, calls: dict[str, str]) -> list[dict]:
    """A user turn: its ``tool_result`` blocks as ``tool`` messages, in order with its text."""
    if not isinstance(content, list):
        return [{"role": "user", "content": _text(content, where)}]
    out: list[dict] = []
    text: list[str] = []
    for j, block in enumerate(content):
        at = f"{where}.{j}"
        if not (isinstance(block, dict) and block.get("type") == "tool_result"):
            text.append(_block_text(block, at))
            continue
        if text:
            out.append({"role": "user", "content": "".join(text)})
            text = []
        call_id = block.get("tool_use_id")
        if not isinstance(call_id, str) or call_id not in calls:
            raise ApiError(400, f"{at}.tool_use_id: no earlier tool_use block has the id {str(call_id)[:70]!r}",
                           param=f"{at}.tool_use_id")
        result = block.get("content", "")
        result = _text(result, f"{at}.content") if result is not None else ""
        is_error = block.get("is_error", False)
        if not isinstance(is_error, bool):
            raise ApiError(400, f"{at}.is_error must be a boolean", param=f"{at}.is_error")
        out.append({"role": "tool", "tool_call_id": call_id, "name": calls[call_id],
                    "content": f"Error: {result}" if is_error else result})
    if text or not out:
        out.append({"role": "user", "content": "".join(text)})
    return out


def _conversation(body: dict) -> list[dict]:
    messages = field_of(body, "messages", list, required=True)
    if not messages:
        raise ApiError(400, "messages: at least one message is required", param="messages")
    out = []
    system = body.get("system")
    if system is not None:
        out.append({"role": "system", "content": _text(system, "system")})
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
    """The pool's ``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``response_format``."""
    tools = field_of(body, "tools", list, default=[])
    out: list[dict[str, Any]] = []
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
        function: dict[str, Any] = {"name": name, "description": description or "", "parameters": schema}
        if tool.get("strict") is not None:
            function["strict"] = bool(tool["strict"])
        out.append({"type": "function", "function": function})
    options: dict = {"tools": out or None}
    choice = field_of(body, "tool_choice", dict)
    if choice is not None:
        kind = choice.get("type")
        if kind not in ("auto", "any", "tool", "none"):
            raise ApiError(400, f"tool_choice.type must be auto, any, tool or none, got {str(kind)[:40]!r}",
                           param="tool_choice.type")
        if kind in ("any", "tool") and not out:
            raise ApiError(400, f"tool_choice {kind!r} needs 'tools'", param="tool_choice")
        if kind == "tool":
            if choice.get("name") not in [t["function"]["name"] for t in out]:
                raise ApiError(400, f"tool_choice.name: {str(choice.get('name'))[:64]!r} is not the name of a tool "
                               "in 'tools'", param="tool_choice.name")
            options["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        else:
            options["tool_choice"] = {"any": "required"}.get(kind, kind)
        parallel = choice.get("disable_parallel_tool_use")
        if parallel is not None:
            if not isinstance(parallel, bool):
                raise ApiError(400, "tool_choice.disable_parallel_tool_use must be a boolean",
                               param="tool_choice.disable_parallel_tool_use")
            options["parallel_tool_calls"] = not parallel
    if options.get("tool_choice") in ("none", "auto") and not out:  # nothing to choose from: asks for nothing
        options.pop("tool_choice")
    fmt = _output_format(body)
    if fmt is not None:
        options["response_format"] = {"type": "json_schema",
                                      "json_schema": {"name": "output", "schema": fmt, "strict": True}}
    return {k: v for k, v in options.items() if v is not None}


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
    return fmt["schema"]


def _params(body: dict) -> dict:
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
    return {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": field_of(body, "top_p", (int, float)),
        "top_k": field_of(body, "top_k", int),
        "stop": stops or None,
        **_tools(body),
    }


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
        protocol="anthropic",
        start=start,
        delta=delta,
        call_piece=call_piece,
        tool_call=lambda call: close(),
        end=end,
        error=lambda e: [("error", {"type": "error", "error": {"type": "api_error", "message": str(e)}})],
    )


def _translated(e: InvalidParameterError) -> ApiError:
    """The pool's refusal, naming this API's field (``tools.0.input_schema``, not ``tools[0].function.parameters``)."""
    error = api_error("anthropic", e)
    if isinstance(e, ContextLengthError) or not e.param:
        return error
    field = _field(e.param)
    message = str(e)
    message = message.replace(e.param, field, 1) if e.param in message else f"{field}: {message}"
    return ApiError(400, message, error.kind, field)


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
    try:
        return await respond(
            request, lambda: pool.achat(conversation, model=name, stream=True, meta=meta, **params), stream,
            lambda result: _message(rid, model, result.text, result), _shape(rid, model),
        )
    except InvalidParameterError as e:
        raise _translated(e) from None


async def count_tokens(request: web.Request, body: dict) -> web.Response:
    model = field_of(body, "model", str, required=True)
    request[MODEL] = model
    conversation = _conversation(body)
    structure = {k: v for k, v in _tools(body).items() if k != "parallel_tool_calls"}
    name = await resolve_model(request, model)
    try:
        count = await request.app[POOL].acount_tokens(conversation, model=name, **structure)
    except InvalidParameterError as e:
        raise _translated(e) from None
    return web.json_response({"input_tokens": count})
