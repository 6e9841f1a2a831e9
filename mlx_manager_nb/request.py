"""One request as the pool takes it, whatever front end it came from.

A :class:`ChatRequest` is what to answer: typed messages (or a raw prompt), the sampler's
:class:`~mlx_manager_nb.params.GenParams`, tools, a tool choice and a schema, each already
validated by the protocol that parsed it (which names a bad field in its own terms). A
:class:`RequestContext` is who asked and under which limits: the audit row's fields, the audit log
to write it to, a deadline and a priority. The pool never sees a protocol's field names.

:func:`python_request` is the Python API's parser: ``pool.chat(messages, tools=..., **params)``
with OpenAI-shaped message dicts, naming bad fields as that call's keywords (``messages[2].role``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .errors import InvalidParameterError
from .params import GenParams, make_params
from .tools import Tool, make_tools, tool_choice

ROLES = ("system", "user", "assistant", "tool")
NOTEBOOK_PRIORITY = 1  # the user at the keyboard: ahead of any queued HTTP request
HTTP_PRIORITY = 0


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class ToolUse:
    """A call an assistant turn made: ``arguments`` is its JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolResult:
    """What a call returned, answering the call ``call_id``."""

    call_id: str
    content: str
    name: str | None = None


@dataclass(frozen=True)
class Image:
    """An image in a turn, decoded and checked: ``image`` is an RGB ``PIL.Image.Image``; ``nbytes`` the
    bytes it came as (for the audit row); ``digest`` a hash of them (the same image, the same digest);
    ``field`` where the request held it, in its protocol's terms (``messages[0].content[1]``); ``format``
    the format it came in (PNG, JPEG, WEBP, GIF; "pixels" for a PIL image or an array given in Python);
    ``detail`` OpenAI's: "low" one tile; "high" and "auto" cut into tiles as the model's processor does where
    the pool cuts images (its ``image_splitting``), else one tile."""

    image: Any
    nbytes: int
    digest: str
    field: str
    format: str = ""
    detail: str = "auto"


Part = Text | ToolUse | ToolResult | Image


@dataclass(frozen=True)
class Message:
    """One turn: ``role`` is system, user, assistant or tool; ``parts`` its text, calls or result."""

    role: str
    parts: tuple[Part, ...] = ()

    @property
    def text(self) -> str:
        return "".join(p.text if isinstance(p, Text) else p.content if isinstance(p, ToolResult) else ""
                       for p in self.parts)

    def template(self) -> dict:
        """The message as chat templates take it (OpenAI's chat shape)."""
        out: dict[str, Any] = {"role": self.role, "content": self.text}
        calls = [p for p in self.parts if isinstance(p, ToolUse)]
        if calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
        result = next((p for p in self.parts if isinstance(p, ToolResult)), None)
        if result is not None:
            out["tool_call_id"] = result.call_id
            if result.name is not None:
                out["name"] = result.name
        return out


def text(role: str, content: str) -> Message:
    return Message(role, (Text(content),))


@dataclass(frozen=True)
class ChatRequest:
    """What to answer: ``messages`` (a chat) or ``prompt`` (a raw completion: a text or token ids), and how.

    ``tool_choice`` is "auto", "none", "required" or a tool's name; ``schema`` a pydantic model class
    or a JSON schema dict the answer must match.
    """

    messages: tuple[Message, ...] = ()
    prompt: str | tuple[int, ...] | None = None
    params: GenParams = field(default_factory=GenParams)
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "none"
    parallel_tool_calls: bool = True
    schema: Any = None

    @property
    def kind(self) -> str:
        return "complete" if self.prompt is not None else "chat"

    @property
    def structured(self) -> bool:
        return bool(self.tools) or self.schema is not None

    @property
    def images(self) -> tuple[Image, ...]:
        """The request's images, in the order its messages hold them."""
        return tuple(p for m in self.messages for p in m.parts if isinstance(p, Image))


@dataclass(frozen=True)
class RequestContext:
    """Who asked, for the audit row, and the request's limits.

    ``audit``: the log to record it in (None: the pool's). ``http_status``: set for a request answered
    over HTTP, whose failure then records the status it answered with. ``deadline``: a
    ``time.perf_counter()`` value past which generation stops (finish_reason "timeout").
    ``priority``: requests of a higher one wait ahead of others for their model and prefill first; the
    notebook's (the Python API, magics, widgets) are :data:`NOTEBOOK_PRIORITY`, HTTP ones :data:`HTTP_PRIORITY`.
    """

    source: str = "api"
    endpoint: str | None = None  # None: "pool.<kind>"
    protocol: str = "python"
    stream: bool = False
    id: str | None = None
    client_request_id: str | None = None
    client: str | None = None
    user_agent: str | None = None
    http_status: int | None = None
    audit: Any = None
    deadline: float | None = None
    priority: int = NOTEBOOK_PRIORITY

    @classmethod
    def of(cls, meta: dict | RequestContext | None, stream: bool, timeout: float | None = None) -> RequestContext:
        """The context of a Python API call: its ``meta`` (a context, or a dict of its fields, which may
        say ``stream`` otherwise), ``stream`` and ``timeout``."""
        if isinstance(meta, RequestContext):
            given = {f.name: getattr(meta, f.name) for f in fields(cls)} | {"stream": stream}
        else:
            given = {"stream": stream, **(meta or {})}
            unknown = set(given) - {f.name for f in fields(cls)}
            if unknown:
                raise InvalidParameterError("meta", f"meta: unknown field(s) {', '.join(sorted(unknown))}")
        if timeout:
            given["deadline"] = time.perf_counter() + timeout
        return cls(**given)


def _check_text(value: Any, where: str, allow_empty: bool) -> str:
    if not isinstance(value, str) or not (value or allow_empty):
        raise InvalidParameterError(where, f"{where} must be a {'' if allow_empty else 'non-empty '}string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidParameterError(where, f"{where} is not valid Unicode text (it holds a lone surrogate)") from None
    return value


def check_prompt(prompt: Any) -> str:
    return _check_text(prompt, "prompt", allow_empty=False)


def _tool_uses(calls: Any, where: str) -> tuple[ToolUse, ...]:
    if not isinstance(calls, list):
        raise InvalidParameterError(where, f"{where} must be a list of tool calls")
    out = []
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("arguments", "{}"), (str, dict)):
            raise InvalidParameterError(f"{where}[{j}]", f"{where}[{j}] must be "
                                        '{"id": ..., "type": "function", "function": {"name": ..., "arguments": ...}}')
        arguments = fn.get("arguments", "{}")
        out.append(ToolUse(str(c.get("id") or ""), fn["name"],
                           arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)))
    return tuple(out)


def python_messages(messages: Any, local_images: bool = True) -> tuple[Message, ...]:
    """OpenAI-shaped message dicts as typed messages; InvalidParameterError names the bad field.
    ``local_images``: ``image`` parts may hold Python values, paths included (never over HTTP, where
    only ``image_url`` parts are read)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterError("messages", "messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise InvalidParameterError(  # never the content
                f"messages[{i}].role", f"messages[{i}].role must be one of {', '.join(ROLES)}, got "
                f"{repr(m.get('role'))[:40] if isinstance(m, dict) else 'a ' + type(m).__name__}")
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        uses = _tool_uses(calls, f"messages[{i}].tool_calls") if calls is not None else ()
        content = m.get("content")
        given = _content(content, f"messages[{i}].content", m["role"] == "user", local_images) \
            if not (uses and content is None) else ()
        if m["role"] == "tool":
            call_id = m.get("tool_call_id")
            name = m.get("name")
            result = Message("tool", given).text
            parts: tuple[Part, ...] = (ToolResult(call_id if isinstance(call_id, str) else "", result,
                                                  name if isinstance(name, str) else None),)
        else:
            parts = given + uses
        out.append(Message(m["role"], parts))
    return tuple(out)


def _content(content: Any, where: str, images: bool, local: bool) -> tuple[Part, ...]:
    """A message's content: a string, or a list of ``text`` parts and (``images``: in a user message)
    OpenAI's ``{"type": "image_url", "image_url": {"url": "data:..."}}`` parts and (``local``) Python's
    ``{"type": "image", "image": ...}`` (see :func:`.images.from_python`)."""
    kinds = ("image", "image_url") if local else ("image_url",)
    if not isinstance(content, list):
        text = _check_text(content, where, allow_empty=True)
        return (Text(text),) if text else ()
    out: list[Part] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            out.append(Text(_check_text(part.get("text"), f"{at}.text", allow_empty=True)))
        elif kind in kinds and images:
            out.append(image_part(part, at))
        else:
            shown = repr(kind)[:40] if isinstance(part, dict) else "a " + type(part).__name__
            raise InvalidParameterError(at, f"{at} of type {shown} is not supported here (text parts"
                                        f"{', ' + ' and '.join(kinds) + ' parts' if images else ''})")
    return tuple(out)


def image_part(part: dict, where: str) -> Image:
    """The image of a Python ``image`` part or an OpenAI ``image_url`` part (with its ``detail``)."""
    from .images import from_python, from_url

    if part["type"] == "image":
        return from_python(part.get("image"), where)
    given, detail = part.get("image_url"), None
    if isinstance(given, dict):
        detail = given.get("detail")
        if detail not in (None, "auto", "low", "high"):
            raise InvalidParameterError(f"{where}.image_url.detail", f"{where}.image_url.detail must be auto, "
                                        "low or high")
        given = given.get("url")
    return replace(from_url(given, where), detail=detail or "auto")


def structure(tools: Any, choice: Any, schema: Any, schema_field: str, parallel: bool = True) -> dict:
    """The checked tools, tool choice and schema of a request: a schema (named ``schema_field``) needs
    tool choice "none" when tools are given."""
    tool_list = tuple(make_tools(tools)) if tools is not None else ()
    normalized = tool_choice(choice, list(tool_list))
    if schema is not None and normalized != "none":
        raise InvalidParameterError(schema_field,
                                    f"{schema_field} cannot be combined with tools unless tool_choice is 'none'")
    return {"tools": tool_list, "tool_choice": normalized, "schema": schema, "parallel_tool_calls": parallel}


def python_structure(tools: Any = None, tool_choice: Any = None, schema: Any = None, response_format: Any = None,
                     parallel_tool_calls: bool | None = None) -> dict:
    """A chat's tools, tool choice and schema (or OpenAI's ``response_format``), named as ``pool.chat``'s
    keywords and OpenAI's fields are."""
    from .structured import check_schema, from_response_format

    schema_field = "schema"
    if response_format is not None:
        if schema is not None:
            raise InvalidParameterError("response_format", "give schema or response_format, not both")
        schema, schema_field = from_response_format(response_format), "response_format"
    if schema is not None:
        where = schema_field if schema_field == "schema" or isinstance(schema, type) \
            else f"{schema_field}.json_schema.schema"
        schema = check_schema(schema, where)
    return structure(tools, tool_choice, schema, schema_field, parallel_tool_calls is not False)


def python_request(messages: Any = None, prompt: Any = None, *, tools: Any = None, tool_choice: Any = None,
                   schema: Any = None, response_format: Any = None, parallel_tool_calls: bool | None = None,
                   **params: Any) -> ChatRequest:
    """The request of a Python API call (``pool.chat`` / ``pool.complete`` keywords)."""
    gen = make_params(**params)
    if prompt is not None or messages is None:
        chat_only = {"tools": tools, "tool_choice": tool_choice, "schema": schema, "response_format": response_format,
                     "parallel_tool_calls": parallel_tool_calls}
        given = next((name for name, value in chat_only.items() if value is not None), None)
        if given is not None:  # refused, not ignored: a completion has no tools or schema
            raise InvalidParameterError(given, f"{given} is a parameter of pool.chat, not of a completion")
        return ChatRequest(prompt=check_prompt(prompt), params=gen)
    from .images import reading

    with reading():  # the call's images are counted together
        chat = python_messages(messages)
    return ChatRequest(chat, params=gen,
                       **python_structure(tools, tool_choice, schema, response_format, parallel_tool_calls))
