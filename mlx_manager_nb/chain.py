"""The tool-calling loop: ask, run the calls the answer makes, give their results back, ask again.

:meth:`Pool.chain <mlx_manager_nb.model_pool.Pool.chain>`, ``%%chat --tools`` and the chat panel all
drive :func:`rounds`; each asks in its own way (a Result, or a stream it shows as it arrives).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

from .streams import Result, TextStream
from .tools import Tool, ToolCall, tool_turns

TOOL_ROUNDS = 5  # rounds of tool calls before the model must answer in text

Reply = TypeVar("Reply", Result, TextStream)


def rounds(ask: Callable[[list[dict], str | dict | None], Reply], messages: list[dict], tools: list[Tool], *,
           tool_choice: str | dict | None = None, max_rounds: int = TOOL_ROUNDS,
           on_turns: Callable[[list[dict]], None] | None = None) -> Iterator[Reply]:
    """Yield each round's reply to ``messages``, which grows with the calls made and their results.

    ``ask(messages, tool_choice)`` starts a round: ``tool_choice`` applies to the first, later ones
    are "auto", and after ``max_rounds`` rounds of calls the model must answer ("none"). Read each
    reply to its end before asking for the next: its calls then run (a failing function's error is
    its result), ``on_turns`` gets the new turns, and the next round starts. The last reply made no
    calls, or was cut off by ``max_tokens`` (its last call's arguments may be half made, so none
    runs); a caller that stops iterating (the user stopped it) runs no more.
    """
    choice = tool_choice
    for round_ in range(max_rounds + 1):
        reply = ask(messages, "none" if round_ == max_rounds else choice)
        yield reply
        calls = _calls(reply)
        if not calls:
            return
        turns = tool_turns(reply.text, calls, tools)
        messages += turns
        if on_turns is not None:
            on_turns(turns)
        choice = "auto"


def _calls(reply: Result | TextStream) -> list[ToolCall]:
    """The calls a finished reply made (none for a stream left before its end or a reply cut off)."""
    result = reply if isinstance(reply, Result) else reply.result
    return result.tool_calls if result is not None and result.finish_reason != "length" else []
