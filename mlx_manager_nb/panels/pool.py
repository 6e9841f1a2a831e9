"""The pool panel: loaded models, load / unload / pin / unpin, memory and load progress; and its Find
section (see :mod:`.find`): search the hub, download, remove a local model."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from .. import display, store
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
from .find import find_controls, find_layout, wire_find

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
            time.strftime("%H:%M:%S", time.localtime(m.last_used)), "client" if m.auto_loaded else "user",
            "yes" if m.pinned else "", keep,
            f"{size(m.cache_bytes)} / {size(m.disk_cache_bytes)}" if m.kind != "embedding" else "", display.hit_rate(m)]


def _local_options() -> list[str]:
    return ["demo", *(m.name for m in store.list_local_models())]


def _controls() -> SimpleNamespace:
    progress, progress_text = widgets.FloatProgress(min=0, max=1, description="Loading"), widgets.Label()
    return SimpleNamespace(
        table=widgets.HTML(),
        source=widgets.Combobox(description="Model", placeholder="local model, path, org/repo or demo",
                                ensure_option=False, layout=widgets.Layout(width="420px")),
        load=widgets.Button(description="Load", icon="download"),
        target=widgets.Dropdown(description="Loaded"),
        unload=widgets.Button(description="Unload"),
        pin=widgets.Button(description="Pin"),
        unpin=widgets.Button(description="Unpin"),
        memory=widgets.FloatProgress(min=0, max=1, description="Memory"),
        memory_text=widgets.Label(),
        progress=progress,
        progress_text=progress_text,
        progress_row=widgets.HBox([progress, progress_text], layout=widgets.Layout(display="none")),
        error=widgets.HTML(),
    )


def _layout(ui: SimpleNamespace) -> list[widgets.Widget]:
    return [ui.table, widgets.HBox([ui.source, ui.load]), widgets.HBox([ui.target, ui.unload, ui.pin, ui.unpin]),
            widgets.HBox([ui.memory, ui.memory_text]), ui.progress_row, ui.error]


def _refresh(pool: Pool, ui: SimpleNamespace) -> None:
    """Show the models and the memory they use."""
    models = pool.models()
    ui.table.value = html_table(["model", "kind", "state", "runs on", "size", "in flight", "last used", "loaded by",
                                 "pinned", "keep-alive", "prompt cache (memory / disk)", "hit rate"],
                                [_model_row(m) for m in models], "No model loaded.")
    set_options(ui.target, [(m.alias or m.name, m.name) for m in models])
    used, budget = pool.memory_used(), pool.max_memory
    ui.memory.value = min(1.0, used / budget) if budget else 0.0
    ui.memory.bar_style = "warning" if ui.memory.value > 0.8 else ""
    ui.memory_text.value = (f"{size(used)} / {size(budget)}; prompt caches: "
                            f"{size(sum(m.cache_bytes for m in models))} in memory, "
                            f"{size(sum(m.disk_cache_bytes for m in models))} on disk")


def _show_progress(ui: SimpleNamespace, event: ProgressEvent | None) -> None:
    """Show a load's progress; hide the bar when it is done (``None``: it failed)."""
    if event is None or event.stage == "ready":
        ui.progress_row.layout.display = "none"
        return
    ui.progress_row.layout.display = None
    ui.progress.value = event.fraction
    ui.progress_text.value = f"{event.name}: {event.stage} {event.fraction:.0%}"


def _listener(call: Callable[..., None], pool: Pool, ui: SimpleNamespace) -> Callable[[PoolEvent], None]:
    """The pool's events, shown: load progress at once, other changes by a coalesced refresh."""
    refresh_soon = coalesced(call, lambda: _refresh(pool, ui))

    def on_event(event: PoolEvent) -> None:
        if isinstance(event, ProgressEvent):
            call(_show_progress, ui, event)
            return
        if isinstance(event, ModelEvent) and event.state == "failed":
            call(_show_progress, ui, None)
        refresh_soon()

    return on_event


def _act(call: Callable[..., None], pool: Pool, ui: SimpleNamespace, action: Callable[[], Any],
         after: Callable[[], None] = lambda: None) -> None:
    """Run ``action`` in a worker thread, then ``after()`` and a refresh, showing its error if it fails."""
    ui.error.value = ""

    def done(_: Any) -> None:
        after()
        _refresh(pool, ui)

    def failed(e: BaseException) -> None:
        after()
        _show_progress(ui, None)
        ui.error.value = error_html(e)
        _refresh(pool, ui)

    background(call, action, done, failed)


def _on_load(call: Callable[..., None], pool: Pool, ui: SimpleNamespace) -> None:
    ref = ui.source.value.strip()
    if not ref:
        ui.error.value = error_html("Enter a local model name, a path, a Hugging Face repo id or 'demo'.")
        return
    ui.load.disabled = True

    def after() -> None:
        ui.load.disabled = False
        ui.source.options = _local_options()

    _act(call, pool, ui, lambda: pool.load(ref), after)


def _on_target(call: Callable[..., None], pool: Pool, ui: SimpleNamespace,
               action: Callable[[str], Any]) -> Callable[[Any], None]:
    """A button's handler: ``action`` on the model chosen in the Loaded dropdown."""

    def click(_: Any) -> None:
        name = ui.target.value
        if name is None:
            ui.error.value = error_html("No model selected.")
        else:
            _act(call, pool, ui, lambda: action(name))

    return click


def pool_panel(pool: Pool | None = None) -> widgets.VBox:
    """Loaded models (state, size, requests, last use, pin, keep-alive); load, unload, pin, unpin; find,
    download and remove models."""
    pool = pool_or_default(pool)
    call = ui_caller()
    ui = _controls()
    ui.load.on_click(lambda _: _on_load(call, pool, ui))
    ui.unload.on_click(_on_target(call, pool, ui, pool.unload))
    ui.pin.on_click(_on_target(call, pool, ui, pool.pin))
    ui.unpin.on_click(_on_target(call, pool, ui, pool.unpin))
    ui.source.options = _local_options()
    find = find_controls()
    wire_find(call, pool, find, lambda: setattr(ui.source, "options", _local_options()))
    _refresh(pool, ui)
    return make_panel(_layout(ui) + find_layout(find), vars(ui) | vars(find),
                      [pool.subscribe(_listener(call, pool, ui))])
