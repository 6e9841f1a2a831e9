"""OpenAI-compatible endpoints: ``/chat/completions`` and ``/completions``.

The adapter (see :mod:`.adapter`) of OpenAI's protocol: its error body and kinds, the parser that
reads a body into a :class:`~mlx_manager_nb.request.ChatRequest` (``tools``, ``tool_choice``,
``parallel_tool_calls`` and ``response_format`` in the shapes the Python API takes too, named as
OpenAI names them), and the final body and stream of chunks. A tool call streams as it is
generated: a ``tool_calls`` delta with its id and name, then deltas of its arguments' text.
:data:`FIELDS` is also how attached models send their parameters.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from .. import scoring
from ..errors import ApiError, InvalidParameterError
from ..logprobs import MAX_TOP_LOGPROBS, TokenLogprob, openai_logprobs
from ..request import ROLES, ChatRequest, RequestContext, check_prompt, python_messages, python_structure
from ..runner import check_fits
from ..scoring import Echo
from ..streams import AsyncTextStream, Result
from ..tools import CallPiece
from .adapter import Adapter, Answer, chat_handler
from .checks import checked, has_images, has_schemas
from .common import (
    AUDITED,
    LIMITS,
    MODEL,
    POOL,
    REQUEST_ID,
    STATS,
    STREAM,
    endpoint,
    field_of,
    http_context,
    off_loop,
    refuse_fields,
    resolve_model,
    sampling,
)
from .streaming import StreamShape, respond

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
          "frequency_penalty": "frequency_penalty", "logit_bias": "logit_bias", "seed": "seed", "stop": "stop",
          "speculative": "speculative"}  # an extra field: false keeps the request off speculative decoding
CHAT_FIELDS = {**FIELDS, "logprobs": "logprobs", "top_logprobs": "top_logprobs"}  # completions' logprobs is a number

MAX_PROMPTS = 2048  # prompts in one completions request (a batch), as OpenAI's
BATCH_AT_ONCE = 32  # of a batch's prompts, those generated at once (the engine's batch size); the others wait
FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls", "cancelled": "stop", "timeout": "length"}
# fields that would change the answer and that we cannot honour: refused, never ignored
REFUSED_CHAT = ("functions", "function_call", "audio", "prediction", "web_search_options")
REFUSED_COMPLETIONS = ("suffix",)
NO_OPS = {  # values that ask for nothing: accepted
    "modalities": (["text"],),
    "best_of": (1,),
    "n": (1,),
    "verbosity": ("medium",),  # the default; asking for shorter or longer answers would go unheard
    "reasoning_effort": ("none", "minimal"),  # these models do not reason
}


def _content(content: Any, where: str) -> str | list:
    if isinstance(content, (str, list)):  # a list's parts are read by python_messages: text and image_url
        return content
    raise ApiError(400, f"{where} must be a string or an array of content parts", param=where)


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
        message = {"role": role, "content": _content(content, f"messages[{i}].content")}
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = m["tool_calls"]
        if role == "tool":
            message.update({k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)})
        out.append(message)
    if not out:
        raise ApiError(400, "'messages' must not be empty", param="messages")
    return python_messages(out, local_images=False)  # the Python API's parser: OpenAI's names are its names


def _max_tokens(body: dict, least: int = 1) -> int | None:
    max_tokens = field_of(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = field_of(body, "max_tokens", int)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is not None and max_tokens < least:
        raise ApiError(400, f"'{name}' must be at least {least}, got {max_tokens}", param=name)
    return max_tokens


def _request(body: dict, kind: str, prompt: str | tuple[int, ...] | None = None) -> ChatRequest:
    refuse_fields(body, REFUSED_CHAT if kind == "chat" else REFUSED_COMPLETIONS, NO_OPS)
    if kind != "chat":
        for name in ("tools", "tool_choice", "response_format"):
            if body.get(name) is not None:
                raise ApiError(400, f"'{name}' is only for /chat/completions", param=name)
        params = sampling(body, FIELDS, max_tokens=_max_tokens(body, least=0) or None, **_completion_logprobs(body))
        return ChatRequest(prompt=prompt, params=params)  # max_tokens 0 (with echo) generates nothing
    params = sampling(body, CHAT_FIELDS, max_tokens=_max_tokens(body))
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


def _prompts(body: dict) -> list[str | tuple[int, ...]]:
    """The prompts of a completion: a string, a list of strings (a batch), token ids, or a list of token-id lists."""
    content = field_of(body, "prompt", (str, list), required=True)
    if isinstance(content, str):
        return [check_prompt(content)]
    if content and all(_token_id(t) for t in content):
        return [tuple(content)]
    if content and all(isinstance(p, str) for p in content):
        prompts: list[str | tuple[int, ...]] = [_checked(check_prompt, p, f"prompt[{i}]") for i, p in
                                                enumerate(content)]
    elif content and all(isinstance(p, list) and p and all(_token_id(t) for t in p) for p in content):
        prompts = [tuple(p) for p in content]
    else:
        raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of "
                       "non-empty token-id lists", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise ApiError(400, f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request",
                       param="prompt")
    return prompts


def _token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked(check: Callable[[Any], str], value: Any, where: str) -> str:
    try:
        return check(value)
    except ValueError as e:
        raise ApiError(400, str(e).replace("prompt", where, 1), param=where) from None


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

    def __init__(self, base: int = 0) -> None:
        self.decoder, self.chars, self.started = codecs.getincrementaldecoder("utf-8")("replace"), 0, False
        self.base = base  # the characters before: an echoed prompt's

    def __call__(self, entries: list[TokenLogprob], text: str) -> list[int]:
        """The offsets of ``entries``, the tokens of ``text`` (the next piece of the completion)."""
        if not self.started and entries:  # the detokenizer drops the first token's leading space
            self.started = True
            self.chars = -1 if entries[0].token.startswith(" ") and not text.startswith(" ") else 0
        out = []
        for e in entries:
            out.append(self.base + max(self.chars, 0))
            self.chars += len(self.decoder.decode(bytes(e.bytes)))
        return out


def _top(entry: TokenLogprob) -> dict[str, float]:
    """A token's alternatives as the legacy shape's ``top_logprobs`` dict: the token itself too, as OpenAI's."""
    return {**{t.token: t.logprob for t in entry.top_logprobs}, entry.token: entry.logprob}


def _legacy_logprobs(entries: list[TokenLogprob] | None, text: str, offsets: _Offsets,
                     before: dict | None = None) -> dict | None:
    """A completion choice's ``logprobs`` in OpenAI's legacy shape for ``entries``, the tokens of
    ``text``, after ``before`` (an echoed prompt's, see :func:`_echoed`). None when not asked."""
    if entries is None:
        return None
    out = {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
           "top_logprobs": [_top(e) for e in entries], "text_offset": offsets(entries, text)}
    return out if before is None else {key: before[key] + value for key, value in out.items()}


@dataclass(frozen=True)
class _Echoed:
    """A prompt as a choice with ``echo`` starts: its text, its token count and, when asked, its tokens'
    ``logprobs`` in the legacy shape (the first token's null, as OpenAI's)."""

    text: str
    prompt_tokens: int
    logprobs: dict | None


def _echoed(echo: Echo) -> _Echoed:
    """``echo`` in the legacy shape (work proportional to the prompt: off the event loop)."""
    if echo.first is None:
        return _Echoed(echo.text, echo.prompt_tokens, None)
    logprobs = _legacy_logprobs([echo.first, *echo.tokens], echo.text, _Offsets())
    assert logprobs is not None
    logprobs["token_logprobs"][0] = logprobs["top_logprobs"][0] = None
    return _Echoed(echo.text, echo.prompt_tokens, logprobs)


def _completion_choice(index: int, result: Result | None, echoed: _Echoed | None, asked: bool) -> dict:
    """One prompt's choice: its echo and what was generated (None: nothing, ``max_tokens: 0``)."""
    text = result.text if result is not None else ""
    entries = (result.logprobs if result is not None else []) if asked else None
    logprobs = _legacy_logprobs(entries, text, _Offsets(len(echoed.text) if echoed else 0),
                                echoed.logprobs if echoed else None)
    return {"index": index, "text": (echoed.text if echoed else "") + text, "logprobs": logprobs,
            "finish_reason": FINISH[result.finish_reason] if result is not None else "length"}


def _shape(kind: str, rid: str, created: int, model: str, include_usage: bool,
           echoed: _Echoed | None = None) -> StreamShape:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    streams: list[AsyncTextStream] = []  # the stream, once started: its log-probabilities go with its deltas
    sent = [0]  # of them, how many went out

    def start(s: AsyncTextStream) -> list:
        streams.append(s)
        if kind == "chat":
            return chunk([choice(None, None, role=True)])
        if echoed is None:
            return []
        return chunk([{"index": 0, "text": echoed.text, "logprobs": echoed.logprobs, "finish_reason": None}])

    offsets = _Offsets(len(echoed.text) if echoed else 0)

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
        logprobs = new_logprobs(text or "") if text or finish else None  # at the end: a tool call's tokens, if unsent
        return {"index": 0, "delta": delta, "logprobs": logprobs if logprobs and logprobs["content"] else None,
                "finish_reason": finish}

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
        untrusted = has_schemas(body, "tools", "functions", "response_format") or await has_images(body, "messages")
        chat_request = await checked(request, untrusted, _request, body, kind)  # tools and schemas are checked there
        created = int(time.time())
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + request[REQUEST_ID]
        return Answer(chat_request, lambda result: _final(kind, rid, created, model, result),
                      _shape(kind, rid, created, model, bool(options.get("include_usage"))))

    return parse


def _final(kind: str, rid: str, created: int, model: str, result: Result, echoed: _Echoed | None = None) -> dict:
    finish = FINISH[result.finish_reason]
    if kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        if result.tool_calls:
            message.update(content=result.text or None, tool_calls=[c.to_openai() for c in result.tool_calls])
        choice = {"index": 0, "message": message, "logprobs": _logprobs(result.logprobs), "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = _completion_choice(0, result, echoed, result.logprobs is not None)
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
            "usage": _usage(result), "system_fingerprint": None}


async def _completions(request: web.Request, body: dict) -> web.StreamResponse:
    """``/completions``: a prompt answers as a chat does, streamed or not, after its ``echo`` if asked; a
    batch of prompts, or ``max_tokens: 0`` with ``echo`` (the prompt scored alone), answers in one body, a
    choice per prompt (each prompt's generation is a request of its own in the audit log)."""
    model = field_of(body, "model", str, required=True)
    request[MODEL] = model
    stream = request[STREAM] = field_of(body, "stream", bool, default=False)
    echo = field_of(body, "echo", bool, default=False)
    prompts = await off_loop(_prompts, body)
    generate = _max_tokens(body, least=0 if echo else 1) != 0
    if stream and (len(prompts) > 1 or not generate):
        raise ApiError(400, "'stream' is not supported yet with several prompts, nor with max_tokens 0",
                       param="stream")
    one = await off_loop(_request, body, "complete", prompts[0])
    name = await resolve_model(request, model)
    pool = request.app[POOL]
    request.app[LIMITS].check_queue(pool, name)
    context = http_context(request, ADAPTER.name, stream)
    rid, created = "cmpl-" + request[REQUEST_ID], int(time.time())
    asked = one.params.logprobs
    batch = [replace(one, prompt=p) for p in prompts]
    if len(prompts) > 1 and generate:
        await off_loop(_check_batch, pool, name, batch)
    echoed: list[_Echoed | None] = [None] * len(prompts)
    if echo:
        request[AUDITED] = True  # the pool records the scoring, refused or not
        scored = replace(context, id=f"{context.id}-echo") if generate else context  # a row of its own
        echoes = await scoring.echo(pool, prompts, name, one.params.top_logprobs if asked else None, scored,
                                     alone=not generate)
        echoed = list(await off_loop(lambda: list(map(_echoed, echoes))))
    if len(prompts) == 1 and generate:
        include_usage = bool(field_of(body, "stream_options", dict, default={}).get("include_usage"))
        return await respond(request, ADAPTER, lambda: pool.astream(one, name, context), stream,
                             lambda result: _final("complete", rid, created, model, result, echoed[0]),
                             _shape("complete", rid, created, model, include_usage, echoed[0]))
    results: list[Result | None] = [None] * len(prompts)
    if generate:
        results = list(await _generate(request, batch, name,
                                       [replace(context, id=f"{context.id}-{i}") for i in range(len(prompts))]))
    text = await off_loop(_batch_body, rid, created, model, results, echoed, asked)
    return web.Response(text=text, content_type="application/json")


def _check_batch(pool: Any, name: str, requests: list[ChatRequest]) -> None:
    """Check each prompt of a batch as the pool will, before any is generated: a bad one refuses the batch, named
    by its index (else the prompts before it were generated, then refused)."""
    for i, r in enumerate(requests):
        try:
            check_fits(pool, r, name)
        except InvalidParameterError as e:
            if e.param == "prompt":
                e.param = f"prompt[{i}]"
            raise


def _batch_body(rid: str, created: int, model: str, results: list[Result | None], echoed: list[_Echoed | None],
                asked: bool) -> str:
    """The JSON body of a batch of prompts (or of one scored alone): a choice per prompt, by index."""
    pairs = list(zip(results, echoed, strict=True))
    choices = [_completion_choice(i, r, e, asked) for i, (r, e) in enumerate(pairs)]
    prompt_tokens = sum(r.usage.prompt_tokens if r else e.prompt_tokens if e else 0 for r, e in pairs)
    completion_tokens = sum(r.usage.completion_tokens for r in results if r is not None)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens}
    return json.dumps({"id": rid, "object": "text_completion", "created": created, "model": model,
                       "choices": choices, "usage": usage, "system_fingerprint": None})


async def _generate(request: web.Request, requests: list[ChatRequest], name: str,
                    contexts: list[RequestContext]) -> list[Result]:
    """Run a batch's requests on the pool, :data:`BATCH_AT_ONCE` at a time (the rest wait here, not in the
    model's queue), each with its context (its own audit row id); the first failure ends them all."""
    pool, stats = request.app[POOL], request.app[STATS]
    gate = asyncio.Semaphore(BATCH_AT_ONCE)

    async def one(r: ChatRequest, context: RequestContext) -> Result:
        async with gate:
            s = pool.astream(r, name, context)
            stats.streams.add(s)
            try:
                result = await s.collect()
            finally:
                await s.aclose()
                stats.streams.discard(s)
            stats.finished(result.usage.completion_tokens, result.duration)
            return result

    stats.requests += 1
    stats.in_flight += 1
    request[AUDITED] = True
    tasks = [asyncio.ensure_future(one(r, c)) for r, c in zip(requests, contexts, strict=True)]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        stats.in_flight -= 1


chat_completions = chat_handler(ADAPTER, _parser("chat"))
completions = endpoint(ADAPTER, _completions)
