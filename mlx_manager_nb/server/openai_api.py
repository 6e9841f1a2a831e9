"""OpenAI-compatible endpoints: ``/chat/completions`` and ``/completions``.

The adapter (see :mod:`.adapter`) of OpenAI's protocol: its error body and kinds, the parser that
reads a body into a :class:`~mlx_manager_nb.request.ChatRequest` (``tools``, ``tool_choice``,
``parallel_tool_calls`` and ``response_format`` in the shapes the Python API takes too, named as
OpenAI names them), and the final body and stream of chunks. A tool call streams as it is
generated: a ``tool_calls`` delta with its id and name, then deltas of its arguments' text.
:data:`FIELDS` is also how attached models send their parameters.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..errors import ApiError
from ..logprobs import MAX_TOP_LOGPROBS, TokenLogprob, openai_logprobs
from ..request import ROLES, ChatRequest, check_prompt, python_messages, python_structure
from ..streams import AsyncTextStream, Result
from ..tools import CallPiece
from .adapter import Adapter, Answer, chat_handler
from .checks import checked, has_schemas
from .common import REQUEST_ID, field_of, refuse_fields, sampling
from .streaming import StreamShape

# kind of error -> OpenAI's type and code
KINDS = {
    "invalid_request": ("invalid_request_error", None),
    "authentication": ("invalid_request_error", "invalid_api_key"),
    "not_found": ("invalid_request_error", "model_not_found"),
    "no_response": ("invalid_request_error", None),  # a stored response id
    "no_previous_response": ("invalid_request_error", "previous_response_not_found"),
    "no_route": ("invalid_request_error", "unknown_url"),
    "context_length": ("invalid_request_error", "context_length_exceeded"),
    "forbidden": ("invalid_request_error", "forbidden"),
    "media_type": ("invalid_request_error", "unsupported_media_type"),
    "too_large": ("invalid_request_error", "request_too_large"),
    "overloaded": ("server_error", "overloaded"),
    "rate_limit": ("rate_limit_error", "rate_limit_exceeded"),
    "api": ("server_error", None),
}


def error_body(error: ApiError) -> dict:
    kind, code = KINDS[error.kind]
    return {"error": {"message": error.message, "type": kind, "param": error.param, "code": code}}


ADAPTER = Adapter("openai", error_body, fields={"schema": "response_format.json_schema.schema"})
# OpenAI's sampling fields -> GenParams' (max_tokens and max_completion_tokens are read apart)
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "presence_penalty": "presence_penalty",
          "frequency_penalty": "frequency_penalty", "logit_bias": "logit_bias", "seed": "seed", "stop": "stop"}
CHAT_FIELDS = {**FIELDS, "logprobs": "logprobs", "top_logprobs": "top_logprobs"}  # completions' logprobs is a number

FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "cancelled": "stop", "timeout": "length"}
# fields that would change the answer and that we cannot honour: refused, never ignored
REFUSED_CHAT = ("functions", "function_call", "audio", "prediction", "web_search_options")
REFUSED_COMPLETIONS = ("suffix",)
NO_OPS = {  # values that ask for nothing: accepted
    "modalities": (["text"],),
    "echo": (False,),
    "best_of": (1,),
    "n": (1,),
    "verbosity": ("medium",),  # the default; asking for shorter or longer answers would go unheard
    "reasoning_effort": ("none", "minimal"),  # these models do not reason
}


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ApiError(400, f"{where}[{i}] of type {str(kind)[:40]!r} is not supported yet: "
                               "only text parts are", param=where)
            parts.append(part["text"])
        return "".join(parts)
    raise ApiError(400, f"{where} must be a string or an array of text parts", param=where)


def _messages(body: dict) -> tuple:
    messages = field_of(body, "messages", list, required=True)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role {str(role)[:40]!r} is not supported "
                           "(system, user, assistant, tool)", param=f"messages[{i}].role")
        content = m.get("content")
        if content is None and role == "assistant":  # an assistant turn without text, or with tool calls
            content = ""
        message = {"role": role, "content": _text_content(content, f"messages[{i}].content")}
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = m["tool_calls"]
        if role == "tool":
            message.update({k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)})
        out.append(message)
    if not out:
        raise ApiError(400, "'messages' must not be empty", param="messages")
    return python_messages(out)  # the Python API's parser: OpenAI's names are its names


def _request(body: dict, kind: str) -> ChatRequest:
    refuse_fields(body, REFUSED_CHAT if kind == "chat" else REFUSED_COMPLETIONS, NO_OPS)
    if kind != "chat":
        for name in ("tools", "tool_choice", "response_format"):
            if body.get(name) is not None:
                raise ApiError(400, f"'{name}' is only for /chat/completions", param=name)
    max_tokens = field_of(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = field_of(body, "max_tokens", int)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is not None and max_tokens <= 0:
        raise ApiError(400, f"'{name}' must be at least 1, got {max_tokens}", param=name)
    if kind != "chat":
        params = sampling(body, FIELDS, max_tokens=max_tokens, **_completion_logprobs(body))
        return ChatRequest(prompt=check_prompt(_prompt(body)), params=params)
    params = sampling(body, CHAT_FIELDS, max_tokens=max_tokens)
    messages = _messages(body)
    structure = python_structure(field_of(body, "tools", list), field_of(body, "tool_choice", (str, dict)),
                                 response_format=field_of(body, "response_format", dict),
                                 parallel_tool_calls=field_of(body, "parallel_tool_calls", bool))
    return ChatRequest(messages, params=params, **structure)


def _completion_logprobs(body: dict) -> dict:
    """A completion's ``logprobs: N`` (alternatives per token, 0 to 20) as the sampler's parameters."""
    if body.get("logprobs") is None or body["logprobs"] is False:
        return {}
    n = field_of(body, "logprobs", int)
    if not 0 <= n <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"'logprobs' must be in [0, {MAX_TOP_LOGPROBS}], got {n}", param="logprobs")
    return {"logprobs": True, "top_logprobs": n}


def _prompt(body: dict) -> str:
    content = field_of(body, "prompt", (str, list), required=True)
    if isinstance(content, list):
        if len(content) != 1 or not isinstance(content[0], str):
            raise ApiError(400, "'prompt' as a list must hold exactly one string (batches are not supported yet)",
                           param="prompt")
        content = content[0]
    return content


def _usage(result: Result) -> dict:
    u = result.usage
    usage: dict[str, Any] = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
             "total_tokens": u.total_tokens}
    if u.cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": u.cached_tokens}
    return usage


def _logprobs(entries: list[TokenLogprob] | None) -> dict | None:
    """A chat choice's ``logprobs`` (the SDK's ``ChoiceLogprobs``); None when not asked."""
    if entries is None:
        return None
    return {"content": openai_logprobs(entries), "refusal": None}


class _Offsets:
    """Each token's offset in the completion's text, in characters (a token holding part of a
    character starts after the last whole one), counted on from the tokens given before."""

    def __init__(self) -> None:
        self.decoder, self.chars, self.started = codecs.getincrementaldecoder("utf-8")("replace"), 0, False

    def __call__(self, entries: list[TokenLogprob], text: str) -> list[int]:
        """The offsets of ``entries``, the tokens of ``text`` (the next piece of the completion)."""
        if not self.started and entries:  # the detokenizer drops the first token's leading space
            self.started = True
            self.chars = -1 if entries[0].token.startswith(" ") and not text.startswith(" ") else 0
        out = []
        for e in entries:
            out.append(max(self.chars, 0))
            self.chars += len(self.decoder.decode(bytes(e.bytes)))
        return out


def _legacy_logprobs(entries: list[TokenLogprob] | None, text: str, offsets: _Offsets) -> dict | None:
    """A completion choice's ``logprobs`` in OpenAI's legacy shape for ``entries``, the tokens of
    ``text``; each ``top_logprobs`` dict holds the sampled token too, as OpenAI's do. None when not asked."""
    if entries is None:
        return None
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{**{t.token: t.logprob for t in e.top_logprobs}, e.token: e.logprob} for e in entries],
            "text_offset": offsets(entries, text)}


def _shape(kind: str, rid: str, created: int, model: str, include_usage: bool) -> StreamShape:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    streams: list[AsyncTextStream] = []  # the stream, once started: its log-probabilities go with its deltas
    sent = [0]  # of them, how many went out

    def start(s: AsyncTextStream) -> list:
        streams.append(s)
        return chunk([choice(None, None, role=True)]) if kind == "chat" else []

    offsets = _Offsets()

    def new_logprobs(text: str) -> dict | None:
        """The log-probabilities of the tokens not sent yet (those of ``text``), when the request asked."""
        entries = streams[0].logprobs
        if entries is None:
            return None
        new, sent[0] = entries[sent[0]:], len(entries)
        return _logprobs(new) if kind == "chat" else _legacy_logprobs(new, text, offsets)

    def chunk(choices: list[dict], usage: dict | None = None) -> list:
        out = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if include_usage:
            out["usage"] = usage
        return [(None, out)]

    def choice(text: str | None, finish: str | None, role: bool = False) -> dict:
        if kind != "chat":
            return {"index": 0, "text": text or "", "logprobs": new_logprobs(text) if text else None,
                    "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if role else {"content": text} if text else {}
        logprobs = new_logprobs(text) if text else None
        return {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def end(result: Result) -> list:
        events = chunk([choice(None, FINISH[result.finish_reason])])
        if include_usage:
            events += chunk([], _usage(result))
        return [*events, (None, "[DONE]")]

    def call_piece(piece: CallPiece) -> list:
        call = ({"index": piece.index, "function": {"arguments": piece.arguments}} if piece.arguments else
                {"index": piece.index, "id": piece.id, "type": "function",
                 "function": {"name": piece.name, "arguments": ""}})
        return chunk([{"index": 0, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}])

    return StreamShape(
        start=start,
        delta=lambda text: chunk([choice(text, None)]),
        call_piece=call_piece,
        end=end,
        error=lambda error: [(None, error_body(error))],
    )


def _parser(kind: str) -> Callable[[web.Request, dict, str, bool], Awaitable[Answer]]:
    async def parse(request: web.Request, body: dict, model: str, stream: bool) -> Answer:
        options = field_of(body, "stream_options", dict, default={})
        untrusted = has_schemas(body, "tools", "functions", "response_format")
        chat_request = await checked(request, untrusted, _request, body, kind)  # tools and schemas are checked there
        created = int(time.time())
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + request[REQUEST_ID]
        return Answer(chat_request, lambda result: _final(kind, rid, created, model, result),
                      _shape(kind, rid, created, model, bool(options.get("include_usage"))))

    return parse


def _final(kind: str, rid: str, created: int, model: str, result: Result) -> dict:
    finish = FINISH[result.finish_reason]
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if result.tool_calls:
            message.update(content=result.text or None, tool_calls=[c.to_openai() for c in result.tool_calls])
        choice = {"index": 0, "message": message, "logprobs": _logprobs(result.logprobs), "finish_reason": finish}
        obj = "chat.completion"
    else:
        logprobs = _legacy_logprobs(result.logprobs, result.text, _Offsets())
        choice = {"index": 0, "text": result.text, "logprobs": logprobs, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": _usage(result), "system_fingerprint": None}


chat_completions = chat_handler(ADAPTER, _parser("chat"))
completions = chat_handler(ADAPTER, _parser("complete"))
