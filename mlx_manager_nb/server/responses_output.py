"""The Responses API's answers: the ``response`` object, its output items, and its stream of events.

Output is a ``message`` item with one ``output_text`` part (when there is text, or nothing else)
and one ``function_call`` item per tool call. A stream numbers every event (``sequence_number``),
opens the message at its first text delta, closes it before a tool call's item (whose arguments
stream as they are generated), and ends with
``response.completed``, ``response.incomplete`` or ``response.failed`` carrying the whole response.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ApiError
from ..logprobs import TokenLogprob, openai_logprobs
from ..streams import AsyncTextStream, Result
from ..tools import CallPiece, ToolCall
from .streaming import SseEvent, StreamShape

# the pool's finish_reason -> the response's status
STATUS = {"stop": "completed", "tool_calls": "completed", "length": "incomplete", "cancelled": "cancelled",
          "timeout": "cancelled"}
# kind of error -> the code of a failed response (one of those the Responses API defines; else server_error)
ERROR_CODES = {"overloaded": "rate_limit_exceeded", "invalid_request": "invalid_prompt",
               "context_length": "invalid_prompt"}
TERMINAL = {"completed": "response.completed", "incomplete": "response.incomplete", "cancelled": "response.incomplete",
            "failed": "response.failed"}


@dataclass(frozen=True)
class Draft:
    """What a response is before it runs: its id, the model name the client sent, and the request
    fields it echoes (instructions, tools, temperature...)."""

    id: str
    model: str
    created_at: int
    echo: dict


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def usage(result: Result) -> dict:
    u = result.usage
    return {"input_tokens": u.prompt_tokens,
            "input_tokens_details": {"cached_tokens": u.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.total_tokens}


def response(draft: Draft, status: str, output: list[dict], result: Result | None = None,
             error: dict | None = None) -> dict:
    """The ``response`` object in ``status``, with ``output`` and (once finished) ``result``'s usage."""
    return {
        "id": draft.id,
        "object": "response",
        "created_at": draft.created_at,
        "status": status,
        "background": False,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": draft.model,
        "output": output,
        **draft.echo,
        "usage": usage(result) if result is not None else None,
    }


def message_item(item_id: str, text: str, status: str, logprobs: list[TokenLogprob] | None = None) -> dict:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [text_part(text, logprobs)]}


def text_part(text: str, logprobs: list[TokenLogprob] | None = None) -> dict:
    """An ``output_text`` part, with its tokens' log-probabilities when the request included them."""
    return {"type": "output_text", "text": text, "annotations": [],
            **({"logprobs": openai_logprobs(logprobs)} if logprobs is not None else {})}


def function_call_item(item_id: str, call: ToolCall, status: str = "completed") -> dict:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call.id, "name": call.name,
            "arguments": call.arguments if status == "completed" else ""}


def output_items(result: Result) -> list[dict]:
    """A finished result's output: its text as a message (if any, or if nothing else), then its tool calls."""
    calls = result.tool_calls
    status = "completed" if STATUS[result.finish_reason] == "completed" else "incomplete"
    text = result.text or not calls
    message = [message_item(new_item_id("msg"), result.text, status, result.logprobs)] if text else []
    return message + [function_call_item(new_item_id("fc"), call) for call in calls]


def final(draft: Draft, result: Result) -> dict:
    """The response to a finished result."""
    return response(draft, STATUS[result.finish_reason], output_items(result), result)


def stream_shape(draft: Draft, finish: Callable[[dict], dict]) -> StreamShape:
    """The Responses event stream of one response; ``finish`` gets (and returns) the terminal response."""
    sequence = itertools.count()
    output: list[dict] = []  # the items finished so far
    message: dict | None = None  # the message item being streamed, if one is open
    call_item: str | None = None  # the id of the function_call item being streamed, if one is open
    streams: list[AsyncTextStream] = []  # the stream, once started: its log-probabilities go with its text
    logprobs: list[TokenLogprob] | None = None  # those of the open message's text, when asked

    def new_logprobs() -> list[TokenLogprob]:
        """The log-probabilities not yet sent, added to the open message's."""
        if logprobs is None:
            return []
        new = (streams[0].logprobs or [])[len(logprobs):]
        logprobs.extend(new)
        return new

    def event(kind: str, **data: Any) -> SseEvent:
        return kind, {"type": kind, **data, "sequence_number": next(sequence)}

    def open_message() -> list[SseEvent]:
        nonlocal message
        message = message_item(new_item_id("msg"), "", "in_progress")
        at = {"item_id": message["id"], "output_index": len(output)}
        return [event("response.output_item.added", output_index=len(output), item={**message, "content": []}),
                event("response.content_part.added", **at, content_index=0, part=text_part(""))]

    def close_message(status: str) -> list[SseEvent]:
        nonlocal message
        if message is None:
            return []
        text = message["content"][0]["text"]
        at = {"item_id": message["id"], "output_index": len(output)}
        done = message_item(message["id"], text, status, logprobs)
        events = [event("response.output_text.done", **at, content_index=0, text=text,
                        logprobs=openai_logprobs(logprobs or [])),
                  event("response.content_part.done", **at, content_index=0, part=done["content"][0]),
                  event("response.output_item.done", output_index=len(output), item=done)]
        output.append(done)
        message = None
        return events

    def start(s: AsyncTextStream) -> list[SseEvent]:
        nonlocal logprobs
        streams.append(s)
        logprobs = [] if s.logprobs is not None else None
        body = response(draft, "in_progress", [])
        return [event("response.created", response=body), event("response.in_progress", response=body)]

    def delta(text: str) -> list[SseEvent]:
        events = open_message() if message is None else []
        assert message is not None
        message["content"][0]["text"] += text
        return [*events, event("response.output_text.delta", item_id=message["id"], output_index=len(output),
                               content_index=0, delta=text, logprobs=openai_logprobs(new_logprobs()))]

    def call_piece(piece: CallPiece) -> list[SseEvent]:
        nonlocal call_item
        if piece.arguments:
            assert call_item is not None
            return [event("response.function_call_arguments.delta", item_id=call_item, output_index=len(output),
                          delta=piece.arguments)]
        events = close_message("completed")
        call_item = new_item_id("fc")
        opened = function_call_item(call_item, ToolCall(piece.id, piece.name, ""), "in_progress")
        return [*events, event("response.output_item.added", output_index=len(output), item=opened)]

    def tool_call(call: ToolCall) -> list[SseEvent]:
        nonlocal call_item
        assert call_item is not None
        at, done = len(output), function_call_item(call_item, call)
        call_item = None
        output.append(done)
        return [event("response.function_call_arguments.done", item_id=done["id"], output_index=at,
                      arguments=call.arguments),
                event("response.output_item.done", output_index=at, item=done)]

    def end(result: Result) -> list[SseEvent]:
        status = STATUS[result.finish_reason]
        events = open_message() if message is None and not output else []  # an empty answer is an empty message
        events += close_message("completed" if status == "completed" else "incomplete")
        body = finish(response(draft, status, list(output), result))
        return [*events, event(TERMINAL[status], response=body)]

    def error(e: ApiError) -> list[SseEvent]:
        partial = [message_item(message["id"], message["content"][0]["text"], "incomplete")] if message else []
        failure = {"code": ERROR_CODES.get(e.kind, "server_error"), "message": e.message}
        body = finish(response(draft, "failed", output + partial, error=failure))
        return [event("response.failed", response=body)]

    return StreamShape(start=start, delta=delta, end=end, error=error, call_piece=call_piece, tool_call=tool_call)
