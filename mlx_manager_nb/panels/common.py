"""What every panel shares: the hop onto the kernel's loop, worker threads, HTML tables, defaults."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable
from html import escape
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets

from .. import defaults
from ..errors import MLXManagerError

if TYPE_CHECKING:
    from ..audit_log import AuditLog
    from ..model_pool import Pool

TABLE_STYLE = "border-collapse:collapse;font-size:12px"
CELL_STYLE = "padding:2px 8px;text-align:left;border-bottom:1px solid #ddd;white-space:nowrap"
REFRESH_INTERVAL = 0.2  # seconds between two refreshes of a panel by its subscriptions


def ui_caller() -> Callable[..., None]:
    """Return ``call(fn, *args)``, which runs ``fn`` on the event loop running now (the kernel's).

    Calls run in the order they were made: from another thread ``call`` schedules ``fn`` with
    ``loop.call_soon_threadsafe``; on the loop's own thread it runs ``fn`` at once unless calls from
    other threads still wait, in which case ``fn`` queues behind them (a load's last "ready" event,
    sent from the kernel's thread, must not overtake its progress events from the engine thread).
    Where no loop was running (scripts, tests) it runs ``fn`` at once.
    """
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    home = threading.get_ident()
    lock = threading.Lock()
    waiting = 0  # calls scheduled and not yet run

    def run(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        nonlocal waiting
        with lock:
            waiting -= 1
        fn(*args)

    def call(fn: Callable[..., Any], *args: Any) -> None:
        nonlocal waiting
        with lock:  # held while scheduling, so a call seeing ``waiting`` queues behind what it counts
            if loop is not None and loop.is_running() and (waiting or threading.get_ident() != home):
                waiting += 1
                loop.call_soon_threadsafe(run, fn, args)
                return
        fn(*args)

    return call


def coalesced(call: Callable[..., None], fn: Callable[[], None], interval: float = REFRESH_INTERVAL,
              delay: float = 0.0) -> Callable[..., None]:
    """Return ``request()``, which runs ``fn`` through ``call``, merging requests into one run.

    Requests made while a run waits join it; the run starts ``delay`` seconds after the first of
    them and at least ``interval`` seconds after the previous run, so a run always follows the last.
    """
    lock = threading.Lock()
    waiting = False
    last = 0.0  # time.monotonic() of the last run

    def run() -> None:
        nonlocal waiting, last
        with lock:
            waiting, last = False, time.monotonic()
        fn()

    def request(*_: Any) -> None:
        nonlocal waiting
        with lock:
            if waiting:
                return
            waiting = True
            wait = max(delay, last + interval - time.monotonic())
        if wait > 0:
            timer = threading.Timer(wait, call, (run,))
            timer.daemon = True
            timer.start()
        else:
            call(run)

    return request


def background(call: Callable[..., None], action: Callable[[], Any], done: Callable[[Any], None],
               failed: Callable[[BaseException], None]) -> None:
    """Run ``action`` in a worker thread, then ``done(result)`` or ``failed(error)`` through ``call``."""

    def work() -> None:
        try:
            result = action()
        except Exception as e:
            call(failed, e)
        else:
            call(done, result)

    threading.Thread(target=work, name="mlx-nb-widget", daemon=True).start()


def on_close(box: widgets.Widget, *cleanups: Callable[[], Any]) -> None:
    """Run ``cleanups`` (unsubscribers) when ``box.close()`` is called."""

    def closed(change: dict) -> None:
        if change["new"] is None:
            for cleanup in cleanups:
                cleanup()

    box.observe(closed, "comm")


def make_panel(children: list[widgets.Widget], parts: dict[str, Any],
               cleanups: Iterable[Callable[[], Any]] = ()) -> widgets.VBox:
    """A VBox of ``children`` with ``parts`` as ``box.parts``; ``cleanups`` run when it is closed."""
    box = widgets.VBox(children)
    box.parts = SimpleNamespace(**parts)
    on_close(box, *cleanups)
    return box


def error_html(error: BaseException | str | None) -> str:
    if error is None:
        return ""
    text = error if isinstance(error, (str, MLXManagerError)) else f"{type(error).__name__}: {error}"
    return f"<div style='color:#b00020;white-space:pre-wrap'>{escape(str(text))}</div>"


def html_table(headers: list[str], rows: list[list[Any]], empty: str) -> str:
    if not rows:
        return f"<i>{escape(empty)}</i>"
    head = "".join(f"<th style='{CELL_STYLE}'>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td style='{CELL_STYLE}'>{escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table style='{TABLE_STYLE}'><tr>{head}</tr>{body}</table>"


def size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def seconds(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 60:
        return f"{s:.2f} s" if s < 10 else f"{s:.0f} s"
    return f"{s / 60:.0f} min" if s < 3600 else f"{s / 3600:.1f} h"


def pool_or_default(pool: Pool | None) -> Pool:
    return pool if pool is not None else defaults.default_pool()


def audit_or_default(audit: AuditLog | None, pool: Pool | None = None) -> AuditLog:
    if audit is not None:
        return audit
    if pool is not None and pool.audit is not None:
        return pool.audit
    return defaults.default_audit()


def ready_options(pool: Pool) -> list[tuple[str, str]]:
    return [(m.alias or m.name, m.name) for m in pool.models() if m.state == "ready"]


def set_options(dropdown: widgets.Dropdown, options: list[tuple[str, str]], preferred: str | None = None) -> None:
    """Replace a dropdown's options, keeping its value where it is still offered."""
    values = [v for _, v in options]
    keep = dropdown.value if dropdown.value in values else preferred if preferred in values else None
    if options != list(dropdown.options):
        dropdown.options = options
    dropdown.value = keep if keep is not None else (values[0] if values else None)
