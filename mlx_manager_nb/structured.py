"""What a chat request asks beyond free text, planned before it reaches the engine.

:func:`plan` turns ``tools``, ``tool_choice`` and ``schema`` (or an OpenAI ``response_format``)
into a :class:`Plan`: the messages and ``tools`` to give the chat template, the request's
:class:`~mlx_manager_nb.constraints.Constraint` (or None), and the parser that turns the raw text
into content, tool calls and a parsed object. Everything is validated here, on the caller's thread:
a schema or tool that cannot be compiled raises :class:`~mlx_manager_nb.errors.InvalidParameterError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pydantic

from . import tools as T
from .constraints import Constraint, compile_grammar, json_grammar, lark_json, make_constraint
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


def plan(tokenizer: Any, messages: list[dict], tools: Any = None, tool_choice: Any = None, schema: Any = None,
         response_format: Any = None, parallel_tool_calls: bool = True) -> Plan:
    """Plan a chat request on the model of ``tokenizer`` (see the module docstring)."""
    param = "schema"
    if response_format is not None:
        if schema is not None:
            raise InvalidParameterError("response_format", "give schema or response_format, not both")
        schema, param = from_response_format(response_format), "response_format"
    tool_list = T.make_tools(tools) if tools is not None else []
    choice = T.tool_choice(tool_choice, tool_list)
    if schema is not None and choice != "none":
        raise InvalidParameterError(param, f"{param} cannot be combined with tools unless tool_choice is 'none'")
    if choice == "none":
        tool_list = []
    native = T.is_native(tokenizer)
    native_json = native and T.native_is_json(tokenizer)
    # tools in the JSON format are always constrained (auto: a lazy grammar); another native format
    # is parsed unconstrained in auto mode, and replaced by the fallback format when a grammar is needed
    constrained = schema is not None or choice != "auto" or any(t.strict for t in tool_list) or not native \
        or native_json
    use_native = native and (not tool_list or not constrained or native_json)
    constraint = parser = None
    if schema is not None:
        grammar_param = param if param == "schema" or isinstance(schema, type) else f"{param}.json_schema.schema"
        constraint = make_constraint(tokenizer, json_grammar(schema_of(schema, param), grammar_param), grammar_param)
    elif tool_list:
        if constrained:
            for i, t in enumerate(tool_list):  # name the tool whose schema llguidance refuses
                where = f"tools[{i}].function.parameters"
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
