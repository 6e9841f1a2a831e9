"""The chat panel: a conversation with a loaded model, streamed, with Stop and Clear; with ``tools``,
the model's calls run and show as ``→ name(args)`` and ``← name: result`` turns. Images uploaded
(``FileUpload``) go with the next message, shown as thumbnails in the transcript."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from html import escape
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from ..chain import rounds
from ..model_pool import ModelEvent
from ..tools import Tool, describe_turn, make_tools
from .common import coalesced, error_html, make_panel, pool_or_default, ready_options, set_options, ui_caller

if TYPE_CHECKING:
    from ..model_pool import Pool

CHAT_META = {"source": "widget", "endpoint": "chat_panel", "protocol": "python", "stream": True}
STREAM_INTERVAL = 0.1  # seconds between two renders of streamed text
THUMBNAIL = 96  # pixels on the longer side of an image's thumbnail in the transcript


def _output(data: dict[str, str]) -> dict:
    return {"output_type": "display_data", "data": data, "metadata": {}}


def _turn(role: str, text: str, thumbnails: Sequence[str] = ()) -> list[dict]:
    """A message as outputs: the role, its images' ``thumbnails`` (base64 PNGs), then the text (an answer
    as Markdown, as ``%%chat`` shows it)."""
    color = {"user": "#1565c0", "assistant": "#2e7d32", "tool": "#6a1b9a"}.get(role, "#555")
    label = _output({"text/html": f"<b style='color:{color}'>{escape(role)}</b>", "text/plain": role})
    images = [_output({"image/png": t, "text/plain": "[image]"}) for t in thumbnails]
    if role == "assistant":
        return [label, _output({"text/markdown": text, "text/plain": text})]
    return [label, *images, _output({"text/html": f"<div style='white-space:pre-wrap'>{escape(text)}</div>",
                                     "text/plain": text})]


def _thumbnails(message: dict) -> list[str]:
    content = message.get("content")
    return [p["thumbnail"] for p in content if "thumbnail" in p] if isinstance(content, list) else []


def _image_parts(files: Any) -> list[dict]:
    """The ``FileUpload``'s files as image parts, each with a thumbnail for the transcript (a file that is
    no image gets none: sending it is refused, naming it)."""
    parts = []
    for f in files:
        data = bytes(f["content"])
        parts.append({"type": "image", "image": data, **({"thumbnail": t} if (t := _thumbnail(data)) else {})})
    return parts


def _thumbnail(data: bytes) -> str | None:
    """A base64 PNG at most :data:`THUMBNAIL` pixels on a side, or None if ``data`` is no image it can read."""
    from .. import images

    try:
        img = images.decode(data, "image").image
    except ValueError:
        return None
    img.thumbnail((THUMBNAIL, THUMBNAIL))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _speed(result: Any, tokens: int, seconds: float) -> str:
    """Tokens, speed and why the answer ended; ``tokens`` and ``seconds`` count a stopped one without a result."""
    if result is None:
        rate = f"{(tokens - 1) / seconds:.1f} tok/s" if tokens > 1 and seconds > 0 else "– tok/s"
        return f"{tokens} tokens · {rate} · stopped"
    tps = result.tokens_per_second
    rate = f"{tps:.1f} tok/s" if tps is not None else "– tok/s"
    reason = "stopped" if result.finish_reason == "cancelled" else result.finish_reason
    return f"{result.usage.completion_tokens} tokens · {rate} · {reason}"


@dataclass
class _Conversation:
    """A panel's messages and its request running now, if any."""

    history: list[dict] = field(default_factory=list)
    current: threading.Event | None = None  # set to stop the running request
    streaming: Any = None  # the running request's stream


@dataclass
class _Meter:
    """Counts a message's streamed deltas over its rounds, for the speed shown while it streams."""

    tokens: int = 0
    first: float | None = None
    shown: float = 0.0  # when the text was last shown

    def tick(self) -> str | None:
        """Count a delta; the rate to show if it is time to show the text again, else None."""
        now = time.perf_counter()
        self.first, self.tokens = self.first or now, self.tokens + 1
        if now - self.shown < STREAM_INTERVAL:
            return None
        self.shown = now
        return f"≈ {(self.tokens - 1) / (now - self.first):.1f} tok/s" if now > self.first else ""

    def seconds(self) -> float:
        return time.perf_counter() - self.first if self.first else 0.0


def _controls() -> SimpleNamespace:
    return SimpleNamespace(
        model=widgets.Dropdown(description="Model"),
        system=widgets.Textarea(description="System", placeholder="optional system prompt",
                                layout=widgets.Layout(width="600px")),
        temperature=widgets.FloatSlider(value=0.7, min=0.0, max=2.0, step=0.05, description="Temperature",
                                        style={"description_width": "initial"}),
        max_tokens=widgets.BoundedIntText(value=512, min=1, max=131072, description="Max tokens"),
        conversation=widgets.Output(layout=widgets.Layout(max_height="480px", overflow="auto")),
        prompt=widgets.Textarea(placeholder="Message", layout=widgets.Layout(width="600px")),
        upload=widgets.FileUpload(accept="image/*", multiple=True, description="Image"),
        send=widgets.Button(description="Send", button_style="primary", icon="paper-plane"),
        stop=widgets.Button(description="Stop", icon="stop", disabled=True),
        clear=widgets.Button(description="Clear", icon="trash"),
        speed=widgets.Label(),
        error=widgets.HTML(),
    )


def _layout(ui: SimpleNamespace) -> list[widgets.Widget]:
    return [widgets.HBox([ui.model, ui.temperature, ui.max_tokens]), ui.system, ui.conversation, ui.prompt,
            widgets.HBox([ui.send, ui.upload, ui.stop, ui.clear, ui.speed]), ui.error]


def _render(ui: SimpleNamespace, history: list[dict], partial: str | None = None) -> None:
    """Show the conversation, and the answer streaming in (``partial``) with a cursor."""
    outputs = [o for m in history for o in _turn(m["role"], describe_turn(m), _thumbnails(m))]
    if partial is not None:
        outputs += _turn("assistant", partial + " ▌")
    empty = [_output({"text/html": "<i>No messages yet.</i>", "text/plain": "No messages yet."})]
    ui.conversation.outputs = tuple(outputs or empty)


def _busy(ui: SimpleNamespace, on: bool) -> None:
    ui.send.disabled, ui.stop.disabled = on, not on


def _asker(pool: Pool, ui: SimpleNamespace, tools: list[Tool]) -> Callable[[list[dict], str | dict | None], Any]:
    """``ask(messages, tool_choice)``: one streamed round with the panel's model and settings."""

    def ask(messages: list[dict], choice: str | dict | None) -> Any:
        return pool.chat(messages, model=ui.model.value, stream=True, meta=dict(CHAT_META),
                         tools=tools or None, tool_choice=choice if tools else None,
                         temperature=ui.temperature.value, max_tokens=ui.max_tokens.value)

    return ask


# -- on the UI's loop: each checks that its request is still the panel's (Clear may have ended it)


def _progress(ui: SimpleNamespace, state: _Conversation, flag: threading.Event, text: str, rate: str) -> None:
    if flag is state.current:
        _render(ui, state.history, text)
        ui.speed.value = rate


def _add_turns(ui: SimpleNamespace, state: _Conversation, flag: threading.Event, turns: list[dict]) -> None:
    if flag is state.current:
        state.history.extend(turns)
        _render(ui, state.history, "")


def _next_round(state: _Conversation, flag: threading.Event, stream: Any) -> None:
    if flag is state.current:
        state.streaming = stream


def _finish(ui: SimpleNamespace, state: _Conversation, flag: threading.Event, stream: Any,
            failure: BaseException | None, tokens: int, seconds: float) -> None:
    if flag is not state.current:
        return
    state.current = state.streaming = None
    if stream.text:
        state.history.append({"role": "assistant", "content": stream.text})
    elif state.history and state.history[-1]["role"] == "user":
        state.history.pop()  # keep user and assistant turns alternating
    ui.speed.value = _speed(stream.result, tokens, seconds) if failure is None else ""
    ui.error.value = error_html(failure)
    _busy(ui, False)
    _render(ui, state.history)


# -- on the request's thread


def _consume(call: Callable[..., None], ui: SimpleNamespace, state: _Conversation, replies: Iterator[Any],
             stream: Any, flag: threading.Event) -> None:
    """Show each round's stream as it arrives; between rounds ``replies`` runs the model's tool calls."""
    failure, meter = None, _Meter()
    try:
        while True:
            with stream:  # leaving early closes the stream, which cancels the request
                for _ in stream:  # after Stop, until the engine reports the cancel (with its counts)
                    rate = meter.tick()
                    if rate is not None and not flag.is_set():
                        call(_progress, ui, state, flag, stream.text, rate)
            following = None if flag.is_set() else next(replies, None)
            if following is None:
                break
            stream = following
            call(_next_round, state, flag, stream)
            if flag.is_set():  # Stop came while the calls ran: the next round ends at once
                stream.close()
    except Exception as e:
        failure = e
    call(_finish, ui, state, flag, stream, failure, meter.tokens, meter.seconds())


# -- the buttons


def _send(call: Callable[..., None], ui: SimpleNamespace, state: _Conversation, ask: Callable[..., Any],
          tools: list[Tool], tool_choice: str | dict | None) -> None:
    text = ui.prompt.value.strip()
    images = _image_parts(ui.upload.value)
    if not (text or images) or state.current is not None:
        return
    turn = {"role": "user", "content": [{"type": "text", "text": text}, *images] if images else text}
    system = [{"role": "system", "content": ui.system.value}] if ui.system.value.strip() else []
    flag = threading.Event()
    replies = rounds(ask, [*system, *state.history, turn], tools, tool_choice=tool_choice,
                     on_turns=lambda turns: call(_add_turns, ui, state, flag, turns))
    try:
        stream = next(replies)  # here, so that a refused request shows at once and leaves no turn
    except Exception as e:
        ui.error.value = error_html(e)
        return
    state.history.append(turn)
    ui.prompt.value, ui.error.value, ui.speed.value = "", "", ""
    ui.upload.value = ()
    state.current, state.streaming = flag, stream
    _busy(ui, True)
    _render(ui, state.history, "")
    threading.Thread(target=_consume, args=(call, ui, state, replies, stream, flag), name="mlx-nb-chat",
                     daemon=True).start()


def _stop(state: _Conversation) -> None:
    if state.current is not None:
        state.current.set()
        state.streaming.close()  # the engine ends the request within a step; its counts come with the end


def _clear(ui: SimpleNamespace, state: _Conversation) -> None:
    _stop(state)
    state.current = state.streaming = None
    state.history.clear()
    ui.speed.value = ui.error.value = ""
    _busy(ui, False)
    _render(ui, state.history)


def chat_panel(pool: Pool | None = None, tools: list | None = None,
               tool_choice: str | dict | None = None) -> widgets.VBox:
    """Chat with a loaded model: the answer streams in; Stop cancels it in the engine.

    ``tools``: Python functions the model may call (see :meth:`Pool.chat`); they run in the panel,
    at most :data:`~mlx_manager_nb.chain.TOOL_ROUNDS` rounds per message. ``tool_choice`` applies
    to the first round of each message, later rounds are "auto".
    """
    pool = pool_or_default(pool)
    tool_list: list[Tool] = make_tools(tools) if tools else []
    call = ui_caller()
    ui, state = _controls(), _Conversation()
    ask = _asker(pool, ui, tool_list)
    ui.send.on_click(lambda _: _send(call, ui, state, ask, tool_list, tool_choice))
    ui.stop.on_click(lambda _: _stop(state))
    ui.clear.on_click(lambda _: _clear(ui, state))

    def refresh_models() -> None:
        set_options(ui.model, ready_options(pool), pool.default)

    refresh_soon = coalesced(call, refresh_models)
    unsubscribe = pool.subscribe(lambda e: refresh_soon() if isinstance(e, ModelEvent) else None)
    refresh_models()
    _render(ui, state.history)
    return make_panel(_layout(ui), {**vars(ui), "history": state.history}, [unsubscribe])
