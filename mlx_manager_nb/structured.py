"""What a chat request asks beyond free text, planned before it reaches the engine.

:func:`plan` turns a request's ``tools``, ``tool_choice`` and ``schema`` into a :class:`Plan`: the
messages and ``tools`` to give the chat template, the request's
:class:`~mlx_manager_nb.constraints.Constraint` (or None), and the parser that turns the raw text
into content, tool calls and a parsed object. A request's parser validates its schema and tools
(:func:`check_schema`, :func:`~mlx_manager_nb.tools.tool_parameters`) before it reaches the pool.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pydantic

from . import tools as T
from .constraints import Constraint, check_grammar, compile_grammar, json_grammar, lark_json, make_constraint
from .errors import InvalidParameterError

ANY_OBJECT = {"type": "object"}


@dataclass
class Plan:
    """One chat request's tools and structure. ``constraint`` is None for free text."""

    messages: list[dict]
    template_tools: list[dict] | None  # for apply_chat_template(tools=...) in native mode
    constraint: Constraint | None
    parser: T.CallParser | None  # None: no tools to parse
    schema: Any = None  # a pydantic model class or a JSON schema dict

    def parse(self, text: str) -> Any:
        """The structured answer: a validated pydantic object, a dict, or None if ``text`` is not one
        (only when generation stopped early: ``length``, ``cancelled``...)."""
        try:
            if isinstance(self.schema, type) and issubclass(self.schema, pydantic.BaseModel):
                return self.schema.model_validate_json(text)
            return json.loads(text)
        except (ValueError, pydantic.ValidationError):
            return None


def schema_of(schema: Any, param: str) -> dict:
    """The JSON schema of a pydantic model class or a schema dict (grammars close it: no extra keys)."""
    if isinstance(schema, type) and issubclass(schema, pydantic.BaseModel):
        return schema.model_json_schema()
    if isinstance(schema, dict):
        return schema
    raise InvalidParameterError(param, f"{param} must be a pydantic model class or a JSON schema dict")


def from_response_format(rf: Any) -> dict | None:
    """The JSON schema an OpenAI ``response_format`` asks for (None for plain text)."""
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidParameterError("response_format", "response_format.type must be 'text', 'json_object' or "
                                                       "'json_schema'")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return ANY_OBJECT
    spec = rf.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise InvalidParameterError("response_format.json_schema",
                                    "response_format.json_schema must be an object holding 'schema'")
    return spec.get("schema", ANY_OBJECT)


def check_schema(schema: Any, param: str) -> Any:
    """``schema`` if it is a pydantic model class or a JSON schema dict that grammars can constrain
    (checked without a model); else InvalidParameterError naming ``param``."""
    check_grammar(json_grammar(schema_of(schema, param), param), param)
    return schema


def plan(tokenizer: Any, messages: list[dict], tools: Sequence[T.Tool] = (), choice: str = "none",
         schema: Any = None, parallel_tool_calls: bool = True) -> Plan:
    """Plan a checked chat request (see :class:`~mlx_manager_nb.request.ChatRequest`) on the model of
    ``tokenizer``; a grammar this model's tokenizer refuses is an error naming the pool's field
    (``schema``, ``tools[i].parameters``), which an adapter renames where its table knows the name."""
    tool_list = list(tools) if choice != "none" else []
    native = T.is_native(tokenizer)
    native_json = native and T.native_is_json(tokenizer)
    # tools in the JSON format are always constrained (auto: a lazy grammar); another native format
    # is parsed unconstrained in auto mode, and replaced by the fallback format when a grammar is needed
    constrained = schema is not None or choice != "auto" or any(t.strict for t in tool_list) or not native \
        or native_json
    use_native = native and (not tool_list or not constrained or native_json)
    constraint = parser = None
    if schema is not None:
        constraint = make_constraint(tokenizer, json_grammar(schema_of(schema, "schema"), "schema"), "schema")
    elif tool_list:
        if constrained:
            for i, t in enumerate(tool_list):  # name the tool whose schema llguidance refuses
                where = f"tools[{i}].parameters"
                compile_grammar(tokenizer, "start: " + lark_json(t.parameters), where)
            grammar = T.tools_grammar(tool_list, choice, parallel_tool_calls)
            where = "tool_choice" if choice not in ("auto", "required") else "tools"
            constraint = make_constraint(tokenizer, grammar, where)
        if use_native:
            tools_json = [t.spec() for t in tool_list]
            parser = T.CallParser(tokenizer.tool_call_start, tokenizer.tool_call_end,
                                  lambda text: tokenizer.tool_parser(text, tools_json))
        else:
            parser = T.CallParser(T.START, T.END, json.loads)
    if use_native:
        rendered, template_tools = T.render_native(messages), [t.spec() for t in tool_list] or None
    else:
        rendered, template_tools = T.render_fallback(messages, tool_list), None
    return Plan(rendered, template_tools, constraint, parser, schema)
