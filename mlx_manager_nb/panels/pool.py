"""The pool panel: loaded models, load / unload / pin / unpin, memory and load progress."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from .. import store
from ..model_pool import ModelEvent, PoolEvent, ProgressEvent
from .common import (
    background,
    coalesced,
    error_html,
    html_table,
    make_panel,
    pool_or_default,
    seconds,
    set_options,
    size,
    ui_caller,
)

if TYPE_CHECKING:
    from ..model_pool import ModelInfo, Pool


def _runs_on(m: ModelInfo) -> str:
    """Where a model runs: this process, its ranks (host, state, running sequences) or the server it is attached to."""
    if m.placement == "sharded":
        return "; ".join(f"rank {i} {r['host']}: {r['state']}" + (f", {r['sequences']} running" if "sequences" in r
                                                                  else "") for i, r in enumerate(m.ranks))
    return m.hosts[0] if m.placement == "attached" and m.hosts else "this process"


def _model_row(m: ModelInfo) -> list[Any]:
    keep = "forever" if m.keep_alive is None else seconds(m.keep_alive)
    return [m.alias or m.name, m.kind, m.state, _runs_on(m), size(m.size_bytes), m.in_flight,
            time.strftime("%H:%M:%S", time.localtime(m.last_used)), "yes" if m.pinned else "", keep]


def _local_options() -> list[str]:
    return ["demo", *(m.name for m in store.list_local_models())]


def pool_panel(pool: Pool | None = None) -> widgets.VBox:
    """Loaded models (state, size, requests, last use, pin, keep-alive); load, unload, pin, unpin."""
    pool = pool_or_default(pool)
    call = ui_caller()
    table = widgets.HTML()
    source = widgets.Combobox(description="Model", placeholder="local model, path, org/repo or demo",
                              ensure_option=False, layout=widgets.Layout(width="420px"))
    load = widgets.Button(description="Load", icon="download")
    target = widgets.Dropdown(description="Loaded")
    unload, pin, unpin = (widgets.Button(description=d) for d in ("Unload", "Pin", "Unpin"))
    memory = widgets.FloatProgress(min=0, max=1, description="Memory")
    memory_text = widgets.Label()
    progress = widgets.FloatProgress(min=0, max=1, description="Loading")
    progress_text = widgets.Label()
    progress_row = widgets.HBox([progress, progress_text], layout=widgets.Layout(display="none"))
    error = widgets.HTML()

    def refresh() -> None:
        models = pool.models()
        table.value = html_table(["model", "kind", "state", "runs on", "size", "in flight", "last used", "pinned",
                                  "keep-alive"],
                                 [_model_row(m) for m in models], "No model loaded.")
        set_options(target, [(m.alias or m.name, m.name) for m in models])
        used, budget = pool.memory_used(), pool.max_memory
        memory.value = min(1.0, used / budget) if budget else 0.0
        memory.bar_style = "warning" if memory.value > 0.8 else ""
        memory_text.value = f"{size(used)} / {size(budget)}"

    def show_progress(event: ProgressEvent | None) -> None:
        if event is None or event.stage == "ready":
            progress_row.layout.display = "none"
            return
        progress_row.layout.display = None
        progress.value = event.fraction
        progress_text.value = f"{event.name}: {event.stage} {event.fraction:.0%}"

    refresh_soon = coalesced(call, refresh)

    def on_event(event: PoolEvent) -> None:
        if isinstance(event, ProgressEvent):
            call(show_progress, event)
            return
        if isinstance(event, ModelEvent) and event.state == "failed":
            call(show_progress, None)
        refresh_soon()

    def act(action: Callable[[], Any], after: Callable[[], None] = lambda: None) -> None:
        error.value = ""

        def done(_: Any) -> None:
            after()
            refresh()

        def failed(e: BaseException) -> None:
            after()
            show_progress(None)
            error.value = error_html(e)
            refresh()

        background(call, action, done, failed)

    def on_load(_: Any) -> None:
        ref = source.value.strip()
        if not ref:
            error.value = error_html("Enter a local model name, a path, a Hugging Face repo id or 'demo'.")
            return
        load.disabled = True

        def after() -> None:
            load.disabled = False
            source.options = _local_options()

        act(lambda: pool.load(ref), after)

    def on_target(action: Callable[[str], Any]) -> Callable[[Any], None]:
        def click(_: Any) -> None:
            if target.value is None:
                error.value = error_html("No model selected.")
            else:
                name = target.value
                act(lambda: action(name))

        return click

    load.on_click(on_load)
    unload.on_click(on_target(pool.unload))
    pin.on_click(on_target(pool.pin))
    unpin.on_click(on_target(pool.unpin))
    source.options = _local_options()
    refresh()
    parts = dict(table=table, source=source, load=load, target=target, unload=unload, pin=pin, unpin=unpin,
                 memory=memory, memory_text=memory_text, progress=progress, progress_text=progress_text,
                 error=error)
    children = [table, widgets.HBox([source, load]), widgets.HBox([target, unload, pin, unpin]),
                widgets.HBox([memory, memory_text]), progress_row, error]
    return make_panel(children, parts, [pool.subscribe(on_event)])

