"""The chat panel: a conversation with a loaded model, streamed, with Stop and Clear; with ``tools``,
the model's calls run and show as ``→ name(args)`` and ``← name: result`` turns."""

from __future__ import annotations

import threading
import time
from html import escape
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from ..model_pool import ModelEvent
from ..tools import Tool, describe_turn, make_tools, tool_turns
from .common import coalesced, error_html, make_panel, pool_or_default, ready_options, set_options, ui_caller

if TYPE_CHECKING:
    from ..model_pool import Pool

CHAT_META = {"source": "widget", "endpoint": "chat_panel", "protocol": "python", "stream": True}
STREAM_INTERVAL = 0.1  # seconds between two renders of streamed text
TOOL_ROUNDS = 5  # rounds of tool calls per message before the model must answer


def _output(data: dict[str, str]) -> dict:
    return {"output_type": "display_data", "data": data, "metadata": {}}


def _turn(role: str, text: str) -> list[dict]:
    """A message as outputs: the role, then the text (an answer as Markdown, as ``%%chat`` shows it)."""
    color = {"user": "#1565c0", "assistant": "#2e7d32", "tool": "#6a1b9a"}.get(role, "#555")
    label = _output({"text/html": f"<b style='color:{color}'>{escape(role)}</b>", "text/plain": role})
    if role == "assistant":
        return [label, _output({"text/markdown": text, "text/plain": text})]
    return [label, _output({"text/html": f"<div style='white-space:pre-wrap'>{escape(text)}</div>",
                            "text/plain": text})]


def _speed(result: Any, tokens: int, seconds: float) -> str:
    """Tokens, speed and why the answer ended; ``tokens`` and ``seconds`` count a stopped one without a result."""
    if result is None:
        rate = f"{(tokens - 1) / seconds:.1f} tok/s" if tokens > 1 and seconds > 0 else "– tok/s"
        return f"{tokens} tokens · {rate} · stopped"
    tps = result.tokens_per_second
    rate = f"{tps:.1f} tok/s" if tps is not None else "– tok/s"
    reason = "stopped" if result.finish_reason == "cancelled" else result.finish_reason
    return f"{result.usage.completion_tokens} tokens · {rate} · {reason}"


def chat_panel(pool: Pool | None = None, tools: list | None = None,
               tool_choice: str | dict | None = None) -> widgets.VBox:
    """Chat with a loaded model: the answer streams in; Stop cancels it in the engine.

    ``tools``: Python functions the model may call (see :meth:`Pool.chat`); they run in the panel.
    ``tool_choice`` applies to the first round of each message, later rounds are "auto".
    """
    pool = pool_or_default(pool)
    tool_list: list[Tool] = make_tools(tools) if tools else []
    call = ui_caller()
    model = widgets.Dropdown(description="Model")
    system = widgets.Textarea(description="System", placeholder="optional system prompt",
                              layout=widgets.Layout(width="600px"))
    temperature = widgets.FloatSlider(value=0.7, min=0.0, max=2.0, step=0.05, description="Temperature",
                                        style={"description_width": "initial"})
    max_tokens = widgets.BoundedIntText(value=512, min=1, max=131072, description="Max tokens")
    conversation = widgets.Output(layout=widgets.Layout(max_height="480px", overflow="auto"))
    prompt = widgets.Textarea(placeholder="Message", layout=widgets.Layout(width="600px"))
    send = widgets.Button(description="Send", button_style="primary", icon="paper-plane")
    stop = widgets.Button(description="Stop", icon="stop", disabled=True)
    clear = widgets.Button(description="Clear", icon="trash")
    speed = widgets.Label()
    error = widgets.HTML()
    history: list[dict] = []
    current: threading.Event | None = None  # set to stop the running request
    streaming: Any = None  # the running request's stream

    def render(partial: str | None = None) -> None:
        outputs = [o for m in history for o in _turn(m["role"], describe_turn(m))]
        if partial is not None:
            outputs += _turn("assistant", partial + " ▌")
        empty = [_output({"text/html": "<i>No messages yet.</i>", "text/plain": "No messages yet."})]
        conversation.outputs = tuple(outputs or empty)

    def busy(on: bool) -> None:
        send.disabled, stop.disabled = on, not on

    def progress(flag: threading.Event, text: str, rate: str) -> None:
        if flag is current:
            render(text)
            speed.value = rate

    def finish(flag: threading.Event, text: str, result: Any, failure: BaseException | None, tokens: int,
               seconds: float) -> None:
        nonlocal current, streaming
        if flag is not current:  # cleared meanwhile
            return
        current = streaming = None
        if text:
            history.append({"role": "assistant", "content": text})
        elif history and history[-1]["role"] == "user":
            history.pop()  # keep user and assistant turns alternating
        speed.value = _speed(result, tokens, seconds) if failure is None else ""
        error.value = error_html(failure)
        busy(False)
        render()

    def add_turns(flag: threading.Event, turns: list[dict], stream: Any) -> None:
        nonlocal streaming
        if flag is current:
            history.extend(turns)
            streaming = stream
            render("")

    def request(messages: list[dict], choice: str | dict | None = None) -> Any:
        return pool.chat(messages, model=model.value, stream=True, meta=dict(CHAT_META),
                         tools=tool_list or None, tool_choice=choice if tool_list else None,
                         temperature=temperature.value, max_tokens=max_tokens.value)

    def consume(stream: Any, messages: list[dict], flag: threading.Event) -> None:
        failure, first, last, n = None, None, 0.0, 0
        try:
            for round_ in range(1, TOOL_ROUNDS + 2):
                with stream:  # leaving early closes the stream, which cancels the request
                    for _ in stream:  # after Stop, until the engine reports the cancel (with its counts)
                        now = time.perf_counter()
                        first, n = first or now, n + 1
                        if now - last >= STREAM_INTERVAL and not flag.is_set():
                            last = now
                            rate = f"≈ {(n - 1) / (now - first):.1f} tok/s" if now > first else ""
                            call(progress, flag, stream.text, rate)
                calls = stream.result.tool_calls if stream.result is not None else []
                if flag.is_set() or not calls or round_ > TOOL_ROUNDS:
                    break
                turns = tool_turns(stream.text, calls, tool_list)
                messages = [*messages, *turns]
                stream = request(messages, "none" if round_ == TOOL_ROUNDS else "auto")
                call(add_turns, flag, turns, stream)
                if flag.is_set():  # Stop came while the calls ran: the next round ends at once
                    stream.close()
        except Exception as e:
            failure = e
        seconds = time.perf_counter() - first if first else 0.0
        call(finish, flag, stream.text, stream.result, failure, n, seconds)

    def on_send(_: Any) -> None:
        nonlocal current, streaming
        text = prompt.value.strip()
        if not text or current is not None:
            return
        turn = {"role": "user", "content": text}
        messages = ([{"role": "system", "content": system.value}] if system.value.strip() else []) + history + [turn]
        try:
            stream = request(messages, tool_choice)
        except Exception as e:
            error.value = error_html(e)
            return
        history.append(turn)
        prompt.value, error.value, speed.value = "", "", ""
        current, streaming = threading.Event(), stream
        busy(True)
        render("")
        threading.Thread(target=consume, args=(stream, messages, current), name="mlx-nb-chat", daemon=True).start()

    def on_stop(_: Any) -> None:
        if current is not None:
            current.set()
            streaming.close()  # the engine ends the request within a step; its counts come with the end

    def on_clear(_: Any) -> None:
        nonlocal current, streaming
        on_stop(None)
        current = streaming = None
        history.clear()
        speed.value = error.value = ""
        busy(False)
        render()

    def refresh_models() -> None:
        set_options(model, ready_options(pool), pool.default)

    send.on_click(on_send)
    stop.on_click(on_stop)
    clear.on_click(on_clear)
    refresh_soon = coalesced(call, refresh_models)
    unsubscribe = pool.subscribe(lambda e: refresh_soon() if isinstance(e, ModelEvent) else None)
    refresh_models()
    render()
    parts = dict(model=model, system=system, temperature=temperature, max_tokens=max_tokens,
                 conversation=conversation, prompt=prompt, send=send, stop=stop, clear=clear, speed=speed,
                 error=error, history=history)
    children = [widgets.HBox([model, temperature, max_tokens]), system, conversation, prompt,
                widgets.HBox([send, stop, clear, speed]), error]
    return make_panel(children, parts, [unsubscribe])
