"""The audit panel: the latest requests, filters and a per-model summary, updated live."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from ..errors import MLXManagerError
from .common import audit_or_default, coalesced, error_html, html_table, make_panel, seconds, ui_caller

if TYPE_CHECKING:
    from ..audit_log import AuditLog

AUDIT_ROWS = 25
ALL = "(all)"


def _local(r: dict) -> datetime | None:
    return datetime.fromisoformat(r["started_at"]).astimezone() if r.get("started_at") else None


def _audit_rows(rows: list[dict]) -> list[list[Any]]:
    """Table rows; times carry their date when the rows span more than one day."""
    from ..audit_log import status_text  # the panel's module imports no database layer

    times = [_local(r) for r in rows]
    dated = len({t.date() for t in times if t is not None}) > 1
    table = []
    for r, t in zip(rows, times, strict=True):
        tps = r.get("tokens_per_second")
        table.append([t.strftime("%Y-%m-%d %H:%M:%S" if dated else "%H:%M:%S") if t else "",
                      r.get("source") or "", r.get("endpoint") or "", r.get("model") or "", status_text(r),
                      r.get("completion_tokens") if r.get("completion_tokens") is not None else "",
                      seconds(r.get("duration")), f"{tps:.1f}" if tps is not None else "",
                      (r.get("error_message") or "")[:80]])
    return table


def _summary_row(s: dict) -> list[Any]:
    tps = s["mean_tokens_per_second"]
    return [s["model"] or "(none)", s["requests"], f"{s['error_rate']:.0%}", seconds(s["p50_duration"]),
            seconds(s["p95_duration"]), f"{tps:.1f}" if tps is not None else "–"]


def audit_panel(audit: AuditLog | None = None) -> widgets.VBox:
    """The latest audit rows with model, status and source filters (all at first), and a per-model summary."""
    audit = audit_or_default(audit)
    call = ui_caller()
    model = widgets.Dropdown(description="Model", options=[ALL])
    status = widgets.Dropdown(description="Status", options=[ALL, "ok", "error", "cancelled", "timeout"])
    source = widgets.Dropdown(description="Source", options=[ALL, "widget", "http", "magic", "api"])
    summary = widgets.HTML()
    rows = widgets.HTML()
    error = widgets.HTML()
    models: set[str] = set()  # every model seen, for the filter

    def value(dropdown: widgets.Dropdown) -> str | None:
        return None if dropdown.value == ALL else dropdown.value

    def refresh() -> None:
        try:
            latest = audit.query(model=value(model), status=value(status), source=value(source), limit=AUDIT_ROWS)
            stats = audit.stats(source=value(source))
        except MLXManagerError as e:
            error.value = error_html(e)
            return
        error.value = ""
        models.update(s["model"] for s in stats if s["model"])
        options = [ALL, *sorted(models)]
        if list(model.options) != options:
            model.options = options  # keeps the value: models are only ever added
        stats = [s for s in stats if value(model) in (None, s["model"])]
        summary.value = html_table(["model", "requests", "error rate", "p50 latency", "p95 latency", "tok/s"],
                                   [_summary_row(s) for s in stats], "No requests yet.")
        rows.value = html_table(["time", "source", "endpoint", "model", "status", "tokens", "duration", "tok/s",
                                 "error"], _audit_rows(latest), "No matching requests.")

    refresh_soon = coalesced(call, refresh)

    for dropdown in (model, status, source):
        dropdown.observe(lambda _: refresh(), "value")
    refresh()
    parts = dict(model=model, status=status, source=source, summary=summary, rows=rows, error=error)
    children = [widgets.HBox([model, status, source]), summary, rows, error]
    return make_panel(children, parts, [audit.subscribe(refresh_soon)])
