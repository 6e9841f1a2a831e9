"""The pool panel's Find section: search the hub, download a result with a byte bar, remove a local model."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from .. import hub, store
from ..display import every, transfer_text
from .common import background, error_html, html_table, set_options, size

if TYPE_CHECKING:
    from ..model_pool import Pool


def find_controls() -> SimpleNamespace:
    bar, bar_text = widgets.FloatProgress(min=0, max=1, description="Download"), widgets.Label()
    return SimpleNamespace(
        query=widgets.Text(description="Find", placeholder="search the Hugging Face hub, e.g. qwen"),
        author=widgets.Text(value="mlx-community", description="Author"),
        search=widgets.Button(description="Search", icon="search"),
        results=widgets.HTML(),
        pick=widgets.Dropdown(description="Repo", layout=widgets.Layout(width="420px")),
        download=widgets.Button(description="Download", icon="download"),
        bar=bar, bar_text=bar_text, bar_row=widgets.HBox([bar, bar_text], layout=widgets.Layout(display="none")),
        local=widgets.Dropdown(description="Local", layout=widgets.Layout(width="420px")),
        remove=widgets.Button(description="Remove", icon="trash"),
        confirm=widgets.Button(description="Confirm remove", button_style="danger",
                               layout=widgets.Layout(display="none")),
        find_error=widgets.HTML(),
    )


def find_layout(ui: SimpleNamespace) -> list[widgets.Widget]:
    return [widgets.HBox([ui.query, ui.author, ui.search]), ui.results, widgets.HBox([ui.pick, ui.download]),
            ui.bar_row, widgets.HBox([ui.local, ui.remove, ui.confirm]), ui.find_error]


def refresh_local(ui: SimpleNamespace) -> None:
    set_options(ui.local, [(f"{m.name} ({size(m.size_bytes)}, {m.origin})", m.name) for m in store.list_local_models()])


def _show_results(ui: SimpleNamespace, found: list[hub.HubModel]) -> None:
    ui.results.value = html_table(
        ["repo", "quantization", "size", "downloads", "likes", "fits max_memory"],
        [[m.repo, m.quantization or "", size(m.size_bytes) if m.size_bytes else "", m.downloads, m.likes,
          "" if m.fits is None else "yes" if m.fits else "no"] for m in found], "Nothing found.")
    set_options(ui.pick, [(m.repo, m.repo) for m in found])


def wire_find(call: Callable[..., None], pool: Pool, ui: SimpleNamespace, changed: Callable[[], None]) -> None:
    """Connect the Find section's buttons; ``changed()`` runs after a download or a removal."""

    def failed(button: widgets.Button) -> Callable[[BaseException], None]:
        def show(e: BaseException) -> None:
            button.disabled = False
            ui.bar_row.layout.display = "none"
            ui.find_error.value = error_html(e)

        return show

    def search(_: Any) -> None:
        ui.find_error.value, ui.search.disabled = "", True
        query, author = ui.query.value.strip(), ui.author.value.strip() or None

        def done(found: list[hub.HubModel]) -> None:
            ui.search.disabled = False
            _show_results(ui, found)

        background(call, lambda: hub.search(query, author=author, max_memory=pool.max_memory), done,
                   failed(ui.search))

    def show(t: hub.Transfer) -> None:
        ui.bar.value = t.done / t.total if t.total else 1.0
        ui.bar_text.value = transfer_text(t)

    def progress() -> hub.TransferProgress:
        """Show a pull's progress ten times a second, and its end (the pull's thread)."""
        due = every(0.1)

        def report(t: hub.Transfer) -> None:
            if due(t.done == t.total):
                call(show, t)

        return report

    def download(_: Any) -> None:
        repo = ui.pick.value
        if not repo:
            ui.find_error.value = error_html("Search, then pick a repo to download.")
            return
        ui.find_error.value, ui.download.disabled, ui.bar_row.layout.display = "", True, None
        ui.bar.value, ui.bar.bar_style = 0.0, ""

        def done(path: Any) -> None:
            ui.download.disabled, ui.bar.bar_style = False, "success"  # the full bar stays, green
            ui.find_error.value = f"<i>Downloaded {repo}: load it as {repo}.</i>"
            refresh_local(ui)
            changed()

        background(call, lambda: hub.pull(repo, progress()), done, failed(ui.download))

    def loaded() -> dict:
        return {m.name: m.path for m in pool.models() if m.path is not None}

    def remove(_: Any) -> None:
        ui.find_error.value = ""
        try:
            model = store.find_local(ui.local.value or "")
            store.check_removable(model, loaded())
        except Exception as e:
            ui.find_error.value = error_html(e)
            return
        ui.confirm.description = f"Remove {model.name} ({size(store.disk_size(model.path))})"
        ui.confirm.layout.display = None

    def confirm(_: Any) -> None:
        ui.confirm.layout.display = "none"
        try:
            store.remove(store.find_local(ui.local.value or ""), loaded())
        except Exception as e:
            ui.find_error.value = error_html(e)
            return
        ui.find_error.value = f"<i>Removed {ui.local.value}.</i>"
        refresh_local(ui)
        changed()

    ui.search.on_click(search)
    ui.download.on_click(download)
    ui.remove.on_click(remove)
    ui.confirm.on_click(confirm)
    refresh_local(ui)
