"""Tools: their definitions, how a chat shows them to the model, and parsing the calls it makes.

Two ways to show tools:

* **native**: the tokenizer has an mlx-lm tool parser (``TokenizerWrapper.has_tool_calling``) and its
  chat template takes ``tools``: the template renders them, the family's parser reads the calls.
* **fallback** (every other model, e.g. the demo model): :data:`FALLBACK_PROMPT` joins the system
  prompt, and the model answers ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one per
  call (the Hermes/Qwen format). Tool results go back as user turns wrapped in ``<tool_response>``.

Constrained calls (see :mod:`mlx_manager_nb.structured`) use that JSON format; models whose native
format is another one are shown the fallback format whenever a grammar is needed.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import pydantic

from .constraints import check_grammar, check_schema, closed_schema, lark_json
from .errors import InvalidParameterError

START, END = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128  # each is a grammar to compile for the request
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
FALLBACK_PROMPT = """\
Tools you can call (JSON schemas):
{tools}
To call tools, answer only with one line per call:
<tool_call>{{"name": <name>, "arguments": {{<arguments>}}}}</tool_call>
Results come back in <tool_response></tool_response>: then answer the user's question with them, in plain text."""


@dataclass(frozen=True)
class Tool:
    """A function the model may call: ``parameters`` is a JSON schema of its arguments object."""

    name: str
    description: str
    parameters: dict
    strict: bool = False
    fn: Callable[..., Any] | None = field(default=None, compare=False)

    def spec(self) -> dict:
        """The OpenAI function-tool shape, as chat templates expect it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                  "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: ``arguments`` is the JSON text, ``args`` the parsed object."""

    id: str
    name: str
    arguments: str

    @property
    def args(self) -> dict:
        return json.loads(self.arguments)

    def to_openai(self) -> dict:
        """The OpenAI ``tool_calls`` item (also how history messages hold it)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def __str__(self) -> str:
        """Readable, as a Python call: ``get_weather(city='Paris', days=2)``."""
        try:
            args = ", ".join(f"{k}={v!r}" for k, v in self.args.items())
        except ValueError:
            args = self.arguments
        return f"{self.name}({args})"


def new_call(name: str, args: Any) -> ToolCall:
    text = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ToolCall(new_call_id(), name, text)


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def function_tool(fn: Callable[..., Any]) -> Tool:
    """A :class:`Tool` from a Python function: its name, its docstring's first paragraph, and its
    type-hinted parameters (``Annotated[int, pydantic.Field(ge=0)]`` adds constraints); no extra keys."""
    hints = get_type_hints(fn, include_extras=True)
    fields: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (hints.get(p.name, Any), default)
    schema = closed_schema(pydantic.create_model(f"{fn.__name__}_args", **fields).model_json_schema())
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    doc = inspect.getdoc(fn) or ""
    return Tool(fn.__name__, doc.split("\n\n")[0].strip(), schema, fn=fn)


def _tool_from_dict(t: dict, where: str) -> Tool:
    """A tool from ``{"type": "function", "function": {...}}`` (Chat Completions) or a flat
    ``{"name", "description", "parameters"}`` (with or without ``"type": "function"``)."""
    if t.get("type", "function") != "function":
        raise InvalidParameterError(f"{where}.type", f"{where}.type {str(t['type'])[:40]!r} is not supported: "
                                                     "only function tools are")
    flat = "function" not in t and "name" in t
    fn, inner = (t, where) if flat else (t.get("function"), f"{where}.function")
    if not isinstance(fn, dict):
        raise InvalidParameterError(inner, f"{inner} must be an object with name, description and parameters")
    name = fn.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidParameterError(f"{inner}.name", f"{inner}.name must be 1 to 64 letters, digits, '_' or '-', "
                                                     f"got {str(name)[:70]!r}")
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise InvalidParameterError(f"{inner}.description", f"{inner}.description must be a string")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    return Tool(name, description, tool_parameters(params, f"{inner}.parameters"), bool(fn.get("strict", False)))


def tool_parameters(schema: Any, where: str) -> dict:
    """A tool's parameters: a valid JSON schema of an object that grammars can constrain; a bad one
    raises InvalidParameterError naming ``where``."""
    check_schema(schema, where)
    if schema.get("type") != "object":
        raise InvalidParameterError(where, f"{where} must describe an object ({{\"type\": \"object\", ...}})")
    check_grammar("start: " + lark_json(schema), where)
    return schema


def check_count(tools: list | tuple, param: str = "tools") -> None:
    """Refuse more than :data:`MAX_TOOLS` tools, before any is looked at."""
    if len(tools) > MAX_TOOLS:
        raise InvalidParameterError(param, f"{param} holds {len(tools)} tools; at most {MAX_TOOLS} (as OpenAI allows)")


def make_tools(tools: Any, param: str = "tools", index: str = "[{}]") -> list[Tool]:
    """Validate tools given as Python functions, :class:`Tool`s or OpenAI function-tool dicts; the
    ``i``-th is named ``param + index.format(i)`` in errors."""
    if not isinstance(tools, (list, tuple)):
        raise InvalidParameterError(param, f"{param} must be a list of functions or function-tool objects")
    check_count(tools, param)
    out: list[Tool] = []
    for i, t in enumerate(tools):
        where = param + index.format(i)
        if isinstance(t, Tool):
            out.append(t)
        elif isinstance(t, dict):
            out.append(_tool_from_dict(t, where))
        elif callable(t):
            try:
                out.append(function_tool(t))
            except (TypeError, NameError, pydantic.PydanticUserError, pydantic.PydanticSchemaGenerationError) as e:
                raise InvalidParameterError(where, f"{where}: cannot describe {t!r} as a tool: {e}") from None
        else:
            raise InvalidParameterError(where, f"{where} must be a function or a function-tool object")
    names = [t.name for t in out]
    for i, n in enumerate(names):
        if n in names[:i]:
            where = param + index.format(i)
            raise InvalidParameterError(where, f"{where}: a tool named {n!r} is defined twice")
    return out


def tool_choice(choice: Any, tools: list[Tool]) -> str:
    """``"auto"``, ``"none"``, ``"required"`` or the name of the one function the model must call.

    Accepts a tool's name and the OpenAI shapes ``{"type": "function", "function": {"name": ...}}``
    and ``{"name": ...}``.
    """
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if "function" in choice else choice.get("name")
        if not isinstance(name, str) or name not in {t.name for t in tools}:
            raise InvalidParameterError("tool_choice", f"tool_choice names {str(name)[:70]!r}, which is not one of "
                                                       f"the tools: {', '.join(t.name for t in tools) or 'none'}")
        return name
    if isinstance(choice, str) and choice in {t.name for t in tools} - {"auto", "none", "required"}:
        return choice
    if choice not in ("auto", "none", "required"):
        raise InvalidParameterError("tool_choice", "tool_choice must be 'auto', 'none', 'required' or "
                                                   f"{{'name': ...}}, got {str(choice)[:40]!r}")
    if choice == "required" and not tools:
        raise InvalidParameterError("tool_choice", "tool_choice is 'required' but no tools are given")
    return choice


def is_native(tokenizer: Any) -> bool:
    """Whether the model's template renders tools and mlx-lm has a parser for its calls."""
    template = getattr(tokenizer, "chat_template", None)
    return bool(getattr(tokenizer, "has_tool_calling", False)) and isinstance(template, str) and "tools" in template


def native_is_json(tokenizer: Any) -> bool:
    """Whether the model's native call format is the fallback's (``<tool_call>{json}</tool_call>``)."""
    parser = getattr(tokenizer, "tool_parser", None)
    return (tokenizer.tool_call_start, tokenizer.tool_call_end) == (START, END) and \
        getattr(parser, "__module__", "").endswith(".json_tools")


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def render_native(messages: list[dict]) -> list[dict]:
    """History for a template that knows tools: call arguments as objects, as HF templates expect."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{**c, "function": {**c["function"], "arguments": _arguments_object(c["function"]["arguments"])}}
                     for c in m["tool_calls"]]
            m = {**m, "content": m.get("content") or "", "tool_calls": calls}
        out.append(m)
    return out


def render_fallback(messages: list[dict], tools: list[Tool]) -> list[dict]:
    """History in the fallback format: calls as ``<tool_call>`` lines, results as user turns; the
    tools (if any) described in the system prompt."""
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            lines = [json.dumps({"name": c["function"]["name"],
                                 "arguments": _arguments_object(c["function"]["arguments"])}, ensure_ascii=False)
                     for c in m["tool_calls"]]
            content = "\n".join([content] * bool(content) + [f"{START}{line}{END}" for line in lines])
            out.append({"role": "assistant", "content": content})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": role, "content": content})
    if tools:
        listing = "\n".join(json.dumps(t.spec()["function"], ensure_ascii=False, separators=(",", ":")) for t in tools)
        prompt = FALLBACK_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def tools_grammar(tools: list[Tool], choice: str, parallel: bool) -> str:
    """A Lark grammar for the answer: ``auto`` is free text up to the first ``<tool_call>`` (a lazy
    grammar), then only calls; ``required`` and a named tool are calls from the first token, and a
    named tool exactly one call.

    Each call is ``<tool_call>{"name": <const>, "arguments": <the tool's parameters>}</tool_call>``;
    arguments always match the schema (whether or not the tool is marked strict).
    """
    chosen = [t for t in tools if choice in ("auto", "required") or t.name == choice]
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                      "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]}
    # a named tool is called once, as OpenAI's and Anthropic's forced calls are (clients such as
    # instructor read exactly one); ``auto`` and ``required`` may add calls unless parallel is off
    more = '("\\n" call)*' if parallel and choice in ("auto", "required") else ""
    lines = [f"calls: call {more}", f'call: "{START}" {lark_json(one)} "{END}"']
    if choice == "auto":
        start = ["start: TEXT | prefix calls_rest",
                 f'TEXT: /(.|\\n)*/ & ~/(.|\\n)*{re.escape(START)}(.|\\n)*/',
                 f"prefix[lazy]: /(.|\\n)*{re.escape(START)}/",
                 f'calls_rest: {lark_json(one)} "{END}" {more}']
    else:
        start = ["start: calls"]
    return "\n".join(start + lines) + "\n"


@dataclass(frozen=True)
class CallPiece:
    """Part of a tool call as it is generated: a call's first piece carries its ``id`` and ``name``
    (``arguments`` empty), the next ones the arguments' text as it grows; joined, they are the call."""

    index: int  # the call's place among the turn's calls
    id: str
    name: str
    arguments: str = ""


ParsedItem = str | CallPiece | ToolCall  # content, a piece of a call, a call complete
# the start of a call in the JSON format, up to its arguments object: the grammar writes the name first
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\{)')


class _JsonEnd:
    """Finds where a JSON object ends, fed its text piece by piece."""

    def __init__(self) -> None:
        self.depth, self.string, self.escape, self.done = 0, False, False, False

    def feed(self, text: str) -> int:
        """How many characters of ``text`` belong to the object: all of them, up to its closing brace."""
        for i, ch in enumerate(text):
            if self.escape:
                self.escape = False
            elif self.string:
                self.escape, self.string = ch == "\\", ch != '"'
            elif ch == '"':
                self.string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


@dataclass
class _OpenCall:
    """The call being generated: where its arguments start in the call's text, and what was sent."""

    id: str
    name: str
    start: int
    index: int
    arguments: str = ""
    sent: int = -1  # characters of the arguments sent as pieces; -1: not even the name yet
    end: _JsonEnd = field(default_factory=_JsonEnd)

    @property
    def announced(self) -> bool:
        """Whether its first piece was sent (from then on it is a call, whatever follows)."""
        return self.sent >= 0


class CallParser:
    """Splits streamed text into content and tool calls, in the order they are generated.

    ``feed(text)`` returns content to show now, :class:`CallPiece` s and the calls completed; text
    that may begin the ``start`` marker is held back until it is known. A call in the JSON format
    (``{"name": ..., "arguments": {...}}``, as the tools grammar writes it) streams as it is
    generated: its name once known, then its arguments' text, which is then the call's
    ``arguments`` exactly. A call in another format is parsed whole, at its end marker, by
    ``parse`` (mlx-lm's parsers: one ``{"name", "arguments"}`` or a list of them; with no ``end``
    marker, Mistral's format, a call runs to the end of the text); one that does not parse is content.

    A call identical to one already made in the turn (same name and arguments) is dropped and sets
    ``repeated``: the turn should end there, since small models otherwise repeat a call until
    ``max_tokens``; nothing fed after it counts. A streamed call is held back while its text could
    still be a repeat; one sent before it turns out to repeat (same arguments in another order)
    is kept, and ends the turn. A streamed call cut off (``max_tokens``) is a call with its
    arguments so far, as OpenAI's are.
    """

    def __init__(self, start: str, end: str, parse: Callable[[str], Any]):
        self.start, self.end, self.parse = start, end, parse
        self.buffer = ""
        self.inside = False
        self.calls: list[ToolCall] = []
        self.repeated = False
        self._open: _OpenCall | None = None

    def feed(self, text: str) -> list[ParsedItem]:
        if self.repeated:
            return []
        self.buffer += text
        items: list[ParsedItem] = []
        while True:
            if not self.inside:
                i = self.buffer.find(self.start)
                if i < 0:
                    keep = _partial_suffix(self.buffer, self.start)
                    items.append(self.buffer[:len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                items.append(self.buffer[:i])
                self.buffer, self.inside = self.buffer[i + len(self.start):], True
            else:
                j = self.buffer.find(self.end) if self.end else -1
                if j < 0:
                    items += self._pieces(self.buffer)
                    break
                body, self.buffer, self.inside = self.buffer[:j], self.buffer[j + len(self.end):], False
                items += self._complete(body)
                if self.repeated:
                    self.buffer = ""
                    break
        return self._content(items)

    def finish(self) -> list[ParsedItem]:
        """What is left at the end of the text: an unclosed call parses if it can (some models end
        the turn without the closing tag), and a streamed one ends with what was generated of it."""
        rest, self.buffer = self.buffer, ""
        if not self.inside:
            return self._content([rest.rstrip() if self.calls else rest])
        return self._content(self._complete(rest, closed=False))

    def _content(self, items: list[ParsedItem]) -> list[ParsedItem]:
        """``items`` without empty text, and without blank text once a call is made."""
        blank_out = bool(self.calls) or (self._open is not None and self._open.announced)
        return [i for i in items if not isinstance(i, str) or (i.strip() if blank_out else i)]

    def _pieces(self, body: str) -> list[ParsedItem]:
        """The pieces of the call whose text so far is ``body``: its name once the arguments' opening
        brace follows it, then the arguments as they grow; nothing while it may repeat an earlier call."""
        if self._open is None:
            head = CALL_HEAD.match(body)
            if head is None:
                return []
            try:
                name = json.loads(f'"{head.group(1)}"')
            except ValueError:
                return []
            self._open = _OpenCall(new_call_id(), name, head.end(), len(self.calls))
        call = self._open
        if not call.end.done:
            new = body[call.start + len(call.arguments):]
            call.arguments += new[:call.end.feed(new)]
        if not call.announced and any(c.name == call.name and c.arguments.startswith(call.arguments)
                                      for c in self.calls):
            return []
        out: list[ParsedItem] = [] if call.announced else [CallPiece(call.index, call.id, call.name)]
        call.sent = max(call.sent, 0)
        if len(call.arguments) > call.sent:
            out.append(CallPiece(call.index, call.id, call.name, call.arguments[call.sent:]))
            call.sent = len(call.arguments)
        return out

    def _complete(self, body: str, closed: bool = True) -> list[ParsedItem]:
        """The items a call's whole text adds: the rest of a streamed call, else the calls it parses
        to, else (it does not parse) the text as content."""
        items = self._pieces(body)
        if self._open is not None and self._open.announced:
            return [*items, self._close_open()]
        self._open = None
        parsed = self._calls(body)
        if parsed is None:
            return [self.start + body + (self.end if closed else "")]
        return self._made(self._fresh(parsed, self.calls))

    def _close_open(self) -> ToolCall:
        """The streamed call, as it was sent; one that repeats an earlier call is kept (it was sent)
        and ends the turn."""
        assert self._open is not None
        call = ToolCall(self._open.id, self._open.name, self._open.arguments)
        self._open = None
        with contextlib.suppress(ValueError):  # arguments cut off by max_tokens repeat nothing
            self._fresh([call], self.calls)
        self.calls.append(call)
        return call

    def _made(self, calls: list[ToolCall]) -> list[ParsedItem]:
        """Calls parsed whole: each as its pieces (its name, then all its arguments) and itself."""
        items: list[ParsedItem] = []
        for call in calls:
            index = len(self.calls)
            items += [CallPiece(index, call.id, call.name), CallPiece(index, call.id, call.name, call.arguments), call]
            self.calls.append(call)
        return items

    def _fresh(self, parsed: list[ToolCall], made: list[ToolCall]) -> list[ToolCall]:
        """The calls of ``parsed`` up to the first that repeats one already made (which sets ``repeated``)."""
        seen = {(c.name, json.dumps(c.args, sort_keys=True)) for c in made}
        for i, c in enumerate(parsed):
            key = (c.name, json.dumps(c.args, sort_keys=True))
            if key in seen:
                self.repeated = True
                return parsed[:i]
            seen.add(key)
        return parsed

    def _calls(self, body: str) -> list[ToolCall] | None:
        try:
            parsed = self.parse(body.strip())
            calls = []
            for c in parsed if isinstance(parsed, list) else [parsed]:
                name, args = c["name"], c.get("arguments", {})
                args = json.loads(args) if isinstance(args, str) else args
                if not isinstance(name, str) or not isinstance(args, dict):
                    return None
                calls.append(new_call(name, args))
        except Exception:  # whatever a parser raises, the text stays content
            return None
        return calls or None


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def tool_turns(text: str, calls: list[ToolCall], tools: list[Tool]) -> list[dict]:
    """The assistant turn that made ``calls``, then one ``tool`` turn per call with its function's result."""
    turns: list[dict] = [{"role": "assistant", "content": text or None, "tool_calls": [c.to_openai() for c in calls]}]
    return turns + [{"role": "tool", "tool_call_id": c.id, "name": c.name, "content": run_call(c, tools)}
                    for c in calls]


def describe_turn(message: dict) -> str:
    """A history message as text for people: its content, then ``→ name(args)`` for each call it made;
    a tool result as ``← name: result``."""
    if message.get("role") == "tool":
        return f"← {message.get('name') or message.get('tool_call_id', 'tool')}: {message.get('content', '')}"
    calls = [ToolCall(c.get("id", ""), c["function"]["name"], c["function"]["arguments"]
                      if isinstance(c["function"]["arguments"], str) else json.dumps(c["function"]["arguments"]))
             for c in message.get("tool_calls") or []]
    content = message.get("content")
    if isinstance(content, list):  # content parts: the texts, and an image as [image]
        content = " ".join(p.get("text", "") if p.get("type") == "text" else "[image]" for p in content)
    text: str = content or ""
    return "\n".join([text] * bool(text) + [f"→ {c}" for c in calls])


def run_call(call: ToolCall, tools: list[Tool]) -> str:
    """Run a call with its Python function; the result (or the error) as text for a ``tool`` message."""
    fn = next((t.fn for t in tools if t.name == call.name and t.fn is not None), None)
    if fn is None:
        return f"Error: no function named {call.name!r}"
    try:
        result = fn(**call.args)
    except Exception as e:
        return f"Error: {type(e).__name__}: {e}"
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
