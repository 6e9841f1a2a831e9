"""The OpenAI Responses API: ``POST /responses``, and ``GET`` / ``DELETE /responses/{id}`` for stored ones.

A request's ``input`` (a string, or message, ``function_call`` and ``function_call_output``
items), preceded by the stored conversation ``previous_response_id`` names and led by
``instructions``, becomes a chat for the pool. A field that would change the answer is honoured
or refused with a 400 naming it, never ignored. :func:`_structure` is the one place that turns
tools and structured output into the request's. The answers' shapes are in
:mod:`.responses_output`; stored responses in :mod:`mlx_manager_nb.response_store`.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from typing import Any

from aiohttp import web

from ..errors import ApiError
from ..images import from_url
from ..logprobs import MAX_TOP_LOGPROBS
from ..request import ChatRequest, Image, Message, Text, ToolResult, ToolUse, structure
from ..structured import ANY_OBJECT, check_schema
from ..tools import Tool, check_count, tool_parameters
from . import openai_api
from .adapter import Adapter, Answer, chat_handler
from .checks import checked, has_images
from .common import REQUEST_ID, RESPONSES, endpoint, field_of, refuse_fields, sampling
from .responses_output import Draft, final, new_item_id, stream_shape

BUILT_IN_TOOLS = ("web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11",
                  "file_search", "computer_use_preview", "computer", "code_interpreter", "image_generation", "mcp",
                  "local_shell", "shell", "apply_patch", "custom", "tool_search")
REFUSED = ("conversation", "prompt", "max_tool_calls")  # would change the answer and cannot be honoured
NO_OPS = {  # values that ask for nothing: accepted
    "background": (False,),
    "truncation": ("disabled",),
}
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
SUMMARIES = ("auto", "concise", "detailed")  # reasoning.summary: a summary of reasoning these models do not do
# the Responses API's sampling fields -> GenParams'
FIELDS = {"temperature": "temperature", "top_p": "top_p", "max_output_tokens": "max_tokens",
          "speculative": "speculative"}
ADAPTER = Adapter("openai", openai_api.error_body,
                  fields={"messages": "input", "max_tokens": "max_output_tokens", "schema": "text.format.schema"})
MAX_METADATA = 16  # key-value pairs, each key up to 64 characters and value up to 512, as OpenAI's


def _refuse(body: dict) -> None:
    refuse_fields(body, REFUSED, NO_OPS)


def _logprobs(body: dict) -> dict:
    """The sampler's log-probability parameters: asked by ``include``, with ``top_logprobs`` alternatives
    (which ask for nothing without it, as OpenAI's)."""
    include = field_of(body, "include", list, default=[])
    top = field_of(body, "top_logprobs", int, default=0)
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'top_logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {top}", param="top_logprobs")
    return {"logprobs": True, "top_logprobs": top} if "message.output_text.logprobs" in include else {}


def _text(parts: Any, where: str, kinds: tuple[str, ...]) -> list[str]:
    """The texts of a message's content: a string, or a list of parts of the given types."""
    if isinstance(parts, str):
        return [parts]
    if not isinstance(parts, list):
        raise ApiError(400, f"{where} must be a string or an array of content parts", param=where)
    return [_text_part(part, f"{where}[{j}]", kinds) for j, part in enumerate(parts)]


def _text_part(part: Any, where: str, kinds: tuple[str, ...]) -> str:
    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
    if kind not in kinds or not isinstance(part.get("text"), str):
        raise ApiError(400, f"{where} of type {str(kind)[:40]!r} is not supported here "
                       f"({', '.join(kinds)} parts only)", param=where)
    return part["text"]


def _content(parts: Any, where: str, role: str) -> list[dict]:
    """A message's content parts as stored: its texts, and a user's ``input_image`` parts (read later,
    in the request's checks: see :func:`_messages`)."""
    if role == "user" and isinstance(parts, list):
        return [_input_image(part, f"{where}[{j}]") if isinstance(part, dict) and part.get("type") == "input_image"
                else {"type": "input_text", "text": _text_part(part, f"{where}[{j}]", ("input_text", "input_image"))}
                for j, part in enumerate(parts)]
    kinds = ("output_text", "input_text") if role == "assistant" else ("input_text",)
    part = "output_text" if role == "assistant" else "input_text"
    return [{"type": part, "text": t, **({"annotations": []} if role == "assistant" else {})}
            for t in _text(parts, where, kinds)]


def _input_image(part: dict, where: str) -> dict:
    """An ``input_image`` part, checked for its shape: ``image_url`` a data URL (or an http(s) one)."""
    if part.get("file_id") is not None:
        raise ApiError(400, f"{where}.file_id: files are not supported; send the image as a data URL in image_url",
                       param=f"{where}.file_id")
    detail = part.get("detail", "auto")
    if detail not in ("auto", "low", "high"):
        raise ApiError(400, f"{where}.detail must be auto, low or high", param=f"{where}.detail")
    if not isinstance(part.get("image_url"), str):
        raise ApiError(400, f"{where}.image_url must be a data URL (data:image/png;base64,...)", param=where)
    return {"type": "input_image", "image_url": part["image_url"], "detail": detail}


def _string(item: dict, name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise ApiError(400, f"{where}.{name} must be a string", param=f"{where}.{name}")
    return value


def _input_item(item: Any, where: str) -> dict:
    """One input item in the shape it is stored and listed in (with an id)."""
    if not isinstance(item, dict):
        raise ApiError(400, f"{where} must be an object", param=where)
    kind = item.get("type", "message")
    item_id = item["id"] if isinstance(item.get("id"), str) else None
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise ApiError(400, f"{where}.role must be user, assistant, system or developer, got {str(role)[:40]!r}",
                           param=f"{where}.role")
        content = _content(item.get("content"), f"{where}.content", role)
        return {"id": item_id or new_item_id("msg"), "type": "message", "role": role, "status": "completed",
                "content": content}
    if kind == "function_call":
        return {"id": item_id or new_item_id("fc"), "type": "function_call", "status": "completed",
                **{name: _string(item, name, where) for name in ("call_id", "name", "arguments")}}
    if kind == "function_call_output":
        output = item.get("output")
        if not isinstance(output, str):
            output = "".join(_text(output, f"{where}.output", ("input_text",)))
        return {"id": item_id or new_item_id("fco"), "type": "function_call_output", "status": "completed",
                "call_id": _string(item, "call_id", where), "output": output}
    raise ApiError(400, f"{where}.type {str(kind)[:40]!r} is not supported "
                   "(message, function_call, function_call_output)", param=f"{where}.type")


def _input_items(body: dict) -> list[dict]:
    value = field_of(body, "input", (str, list), required=True)
    if isinstance(value, str):
        return [_input_item({"role": "user", "content": value}, "input")]
    return [_input_item(item, f"input[{i}]") for i, item in enumerate(value)]


def _messages(items: list[dict], instructions: str | None, stored: int = 0) -> tuple[Message, ...]:
    """The chat to answer: instructions, then the items (the first ``stored`` of them from the stored
    conversation); a model's calls join its turn. Images are decoded here (see :func:`_parse`)."""
    out: list[Message] = [Message("system", (Text(instructions),))] if instructions else []
    for i, item in enumerate(items):
        if item["type"] == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            where = f"input[{i - stored}].content" if i >= stored else "previous_response_id"
            parts = [replace(from_url(part["image_url"], f"{where}[{j}]" if i >= stored else where),
                             detail=part.get("detail", "auto"))
                     if part["type"] == "input_image" else Text(part["text"]) for j, part in enumerate(item["content"])]
            out.append(Message(role, tuple(parts) if any(isinstance(p, Image) for p in parts)
                               else (Text("".join(part["text"] for part in item["content"])),)))
        elif item["type"] == "function_call":
            if not out or out[-1].role != "assistant":
                out.append(Message("assistant", (Text(""),)))
            call = ToolUse(item["call_id"], item["name"], item["arguments"])
            out[-1] = Message("assistant", (*out[-1].parts, call))
        else:
            out.append(Message("tool", (ToolResult(item["call_id"], item["output"]),)))
    return tuple(out)


def _tools(body: dict) -> list[dict]:
    tools = field_of(body, "tools", list, default=[])
    check_count(tools, "tools")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            what = f"the built-in tool {kind!r}" if kind in BUILT_IN_TOOLS else f"a tool of type {str(kind)[:40]!r}"
            raise ApiError(400, f"{where}: {what} is not supported: only function tools are", param="tools")
        name = tool.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ApiError(400, f"{where}.name must be 1 to 64 letters, digits, '_' or '-'", param=f"{where}.name")
        for field, kinds in (("description", str), ("parameters", dict), ("strict", bool)):
            if tool.get(field) is not None and not isinstance(tool[field], kinds):
                raise ApiError(400, f"{where}.{field} must be of type {kinds.__name__}", param=f"{where}.{field}")
        out.append({"type": "function", "name": name, "description": tool.get("description"),
                    "parameters": tool.get("parameters"), "strict": tool.get("strict", True)})
    return out


def _tool_choice(body: dict, tools: list[dict]) -> str | dict:
    choice = field_of(body, "tool_choice", (str, dict), default="auto")
    if choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        if choice.get("name") not in [t["name"] for t in tools]:
            raise ApiError(400, f"tool_choice names the function {str(choice.get('name'))[:64]!r}, "
                           "which is not in 'tools'", param="tool_choice")
        return {"type": "function", "name": choice["name"]}
    kind = choice.get("type") if isinstance(choice, dict) else choice
    raise ApiError(400, f"tool_choice {str(kind)[:40]!r} is not supported (none, auto, required, or a function)",
                   param="tool_choice")


def _text_config(body: dict) -> dict:
    text = field_of(body, "text", dict, default={})
    if text.get("verbosity") not in (None, "medium"):
        raise ApiError(400, "text.verbosity other than 'medium' is not supported", param="text.verbosity")
    fmt = text.get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"format": {"type": kind}, "verbosity": "medium"}
    if kind != "json_schema":
        raise ApiError(400, "text.format.type must be text, json_object or json_schema", param="text.format.type")
    if not isinstance(fmt.get("name"), str) or not NAME.match(fmt["name"]):
        raise ApiError(400, "text.format.name must be 1 to 64 letters, digits, '_' or '-'", param="text.format.name")
    if not isinstance(fmt.get("schema"), dict):
        raise ApiError(400, "text.format.schema must be a JSON schema object", param="text.format.schema")
    for field, kinds in (("description", str), ("strict", bool)):
        if fmt.get(field) is not None and not isinstance(fmt[field], kinds):
            raise ApiError(400, f"text.format.{field} must be of type {kinds.__name__}",
                           param=f"text.format.{field}")
    return {"format": {"type": "json_schema", "name": fmt["name"], "schema": fmt["schema"],
                       "description": fmt.get("description"), "strict": fmt.get("strict", False)},
            "verbosity": "medium"}


def _reasoning(body: dict) -> dict | None:
    """The model does no reasoning: asking for none (or minimal) is honoured, more is refused; a summary of
    its reasoning is accepted and shows nothing, as on OpenAI's models that do not reason (inspect-ai asks
    for one by default)."""
    reasoning = field_of(body, "reasoning", dict)
    if reasoning is None:
        return None
    if reasoning.get("effort") not in (None, "none", "minimal"):
        raise ApiError(400, f"reasoning.effort {str(reasoning['effort'])[:40]!r} is not supported: this model "
                       "does not reason (none or minimal only)", param="reasoning.effort")
    for name in ("summary", "generate_summary"):
        if reasoning.get(name) not in (None, *SUMMARIES):
            raise ApiError(400, f"reasoning.{name} must be one of {', '.join(SUMMARIES)}", param=f"reasoning.{name}")
    return {"effort": reasoning.get("effort"), "summary": reasoning.get("summary") or reasoning.get("generate_summary")}


def _metadata(body: dict) -> dict:
    metadata = field_of(body, "metadata", dict, default={})
    if len(metadata) > MAX_METADATA or not all(
            isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in metadata.items()):
        raise ApiError(400, f"metadata: at most {MAX_METADATA} pairs of keys up to 64 characters and "
                       "string values up to 512", param="metadata")
    return metadata


def _max_tokens(body: dict) -> int | None:
    max_tokens = field_of(body, "max_output_tokens", int)
    if max_tokens is not None and max_tokens <= 0:
        raise ApiError(400, f"'max_output_tokens' must be at least 1, got {max_tokens}", param="max_output_tokens")
    return max_tokens


def _structure(tools: list[dict], tool_choice: str | dict, parallel_tool_calls: bool, text: dict) -> dict:
    """The request's tools, tool choice and schema from what the response echoes of them."""
    checked = [Tool(t["name"], t["description"] or "", tool_parameters(
        t["parameters"] if t["parameters"] is not None else {"type": "object", "properties": {}},
        f"tools[{i}].parameters"), t["strict"]) for i, t in enumerate(tools)]
    choice = tool_choice["name"] if isinstance(tool_choice, dict) else tool_choice
    fmt = text["format"]
    schema = {"json_object": ANY_OBJECT, "json_schema": fmt.get("schema")}.get(fmt["type"])
    if fmt["type"] == "json_schema":
        check_schema(schema, "text.format.schema")
    return structure(checked, choice if checked else None, schema, "text.format", parallel_tool_calls)


async def _history(request: web.Request, previous: str | None) -> list[dict]:
    """The items of the stored conversation ``previous`` ends: its context, then its output."""
    if previous is None:
        return []
    store = request.app[RESPONSES]
    if store is None:
        raise ApiError(400, "previous_response_id: this server does not store responses "
                       "(it runs with store_responses=False)", param="previous_response_id")
    stored = await store.get(previous)
    if stored is None:
        raise ApiError(404, f"Previous response with id {previous[:80]!r} not found.", "no_previous_response",
                       "previous_response_id")
    return stored.context + stored.response["output"]


async def _parse(request: web.Request, body: dict, model: str, stream: bool) -> Answer:
    """Answer ``input`` after the conversation ``previous_response_id`` names; store the response unless
    ``store`` is false or the server keeps none."""
    _refuse(body)
    params = sampling(body, FIELDS, max_tokens=_max_tokens(body), **_logprobs(body))
    instructions = field_of(body, "instructions", str)
    tools = _tools(body)
    tool_choice = _tool_choice(body, tools)
    parallel = field_of(body, "parallel_tool_calls", bool, default=True)
    text = _text_config(body)
    echo = {  # what the response reports of its request, with the defaults this server applies
        "instructions": instructions,
        "max_output_tokens": params.max_tokens,
        "metadata": _metadata(body),
        "parallel_tool_calls": parallel,
        "previous_response_id": field_of(body, "previous_response_id", str),
        "reasoning": _reasoning(body),
        "temperature": params.temperature,
        "text": text,
        "tool_choice": tool_choice,
        "tools": tools,
        "top_logprobs": params.top_logprobs,
        "top_p": params.top_p,
        "truncation": "disabled",
        "user": field_of(body, "user", str),
    }
    store = request.app[RESPONSES] if field_of(body, "store", bool, default=True) else None
    items = _input_items(body)
    history = await _history(request, echo["previous_response_id"])
    context = history + items
    if not context:
        raise ApiError(400, "'input' must hold at least one item", param="input")
    untrusted = bool(tools) or text["format"]["type"] == "json_schema"
    structure = await checked(request, untrusted, _structure, tools, tool_choice, parallel, text)  # checks them
    images = await has_images({"input": context}, "input")  # decoded as schemas are checked
    messages = await checked(request, images, _messages, context, instructions, len(history))
    chat_request = ChatRequest(messages, params=params, **structure)
    draft = Draft("resp_" + request[REQUEST_ID].removeprefix("req_"), model, int(time.time()), echo)

    def finish(response: dict) -> dict:
        if store is not None:
            store.put(response, context)
        return response

    return Answer(chat_request, lambda result: finish(final(draft, result)), stream_shape(draft, finish))


create = chat_handler(ADAPTER, _parse)


async def _stored(request: web.Request) -> tuple[str, Any]:
    response_id = request.match_info["id"]
    store = request.app[RESPONSES]
    stored = await store.get(response_id) if store is not None else None
    if stored is None:
        raise ApiError(404, f"Response with id {response_id[:80]!r} not found.", "no_response")
    return response_id, stored


async def _retrieve(request: web.Request, body: dict) -> web.Response:
    """A stored response, as it was answered."""
    _, stored = await _stored(request)
    return web.json_response(stored.response)


async def _delete(request: web.Request, body: dict) -> web.Response:
    """Forget a stored response (the conversations continuing it keep their own copies)."""
    response_id, _ = await _stored(request)
    store = request.app[RESPONSES]
    assert store is not None
    await store.delete(response_id)
    return web.json_response({"id": response_id, "object": "response", "deleted": True})


async def _input_items_page(request: web.Request, body: dict) -> web.Response:
    """The input items a stored response answered (earlier turns' included), a page at a time."""
    _, stored = await _stored(request)
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "order must be 'asc' or 'desc'", param="order")
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise ApiError(400, "limit must be an integer from 1 to 100", param="limit")
    items = stored.context if order == "asc" else stored.context[::-1]
    after = request.query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ApiError(400, f"after: no input item {after[:80]!r} in this response", param="after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return web.json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                              "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})


retrieve = endpoint(ADAPTER, _retrieve, body=False)
delete = endpoint(ADAPTER, _delete, body=False)
input_items = endpoint(ADAPTER, _input_items_page, body=False)
