"""Output helpers for the magics: tables and notes as HTML + plain-text mimebundles, in-place updates.

A bundle is a dict of mimetype to text, shown with ``IPython.display.display(bundle, raw=True)``:
a notebook renders the HTML, a terminal the plain text.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from html import escape
from typing import TYPE_CHECKING, Any

from IPython.core.displaypub import DisplayPublisher
from IPython.display import display

if TYPE_CHECKING:
    from .hub import Transfer

NONE = "–"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> dict:
    """A table as a bundle; cells are shown with ``str()``, None as a dash."""
    cells = [[NONE if c is None else str(c) for c in row] for row in rows]
    lines = ([list(header)] if header else []) + cells
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))] if lines else []

    def text_row(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip()

    text = [text_row(row) for row in lines]
    if header:
        text.insert(1, "  ".join("-" * w for w in widths))
    head = "<thead><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    html = f'<table class="mlx-nb">{head}<tbody>{body}</tbody></table>'
    return {"text/html": html, "text/plain": "\n".join(text)}


def token_probabilities(entries: Sequence[Any]) -> dict:
    """An answer's tokens (:class:`~mlx_manager_nb.logprobs.TokenLogprob`) as a bundle: in HTML each
    token shaded by its probability (the less likely, the darker the orange), its alternatives on
    hover; in plain text one line per token."""
    spans, lines = [], []
    for e in entries:
        p = math.exp(e.logprob)
        alternatives = ", ".join(f"{t.token!r} {math.exp(t.logprob):.1%}" for t in e.top_logprobs)
        hover = f"{p:.1%}" + (f" | {alternatives}" if alternatives else "")
        spans.append(f'<span title="{escape(hover)}" style="background: rgba(255, 140, 0, {1 - p:.2f}); '
                     f'white-space: pre-wrap">{escape(e.token)}</span>')
        lines.append(f"{e.token!r:20} {p:7.1%}" + (f"   {alternatives}" if alternatives else ""))
    return {"text/html": f'<div class="mlx-nb-logprobs">{"".join(spans)}</div>', "text/plain": "\n".join(lines)}


def note(text: str) -> dict:
    """One line of text, set small and gray in a notebook."""
    return {"text/html": f'<div style="color:gray;font-size:smaller">{escape(text)}</div>', "text/plain": text}


def progress(label: str, stage: str, fraction: float) -> dict:
    """A progress bar (an HTML ``<progress>``, or a text bar) for ``stage`` at ``fraction``."""
    pct = max(0, min(100, round(100 * fraction)))
    bar = "#" * (pct // 5)
    return {
        "text/html": f'<progress max="100" value="{pct}" style="width:14em"></progress> '
        f"{escape(label)}: {escape(stage)} {pct}%",
        "text/plain": f"{label}: {stage} [{bar:.<20}] {pct}%",
    }


def transfer_text(t: Transfer) -> str:
    """A pull's state: ``12.0 MiB of 40.0 MiB at 5.1 MiB/s, 6 s left``."""
    eta = "" if t.eta is None else f", {seconds(t.eta)} left"
    return f"{size(t.done)} of {size(t.total)} at {size(int(t.rate))}/s{eta}"


def transfer(label: str, t: Transfer) -> dict:
    """A byte progress bar (a pull's): done of total, rate and time left."""
    return progress(label, transfer_text(t), t.done / t.total if t.total else 1.0)


def show(bundle: dict) -> None:
    display(bundle, raw=True)


def error(message: str) -> None:
    """Print one error line to stderr (shown in the cell's output, no traceback)."""
    print(message, file=sys.stderr, flush=True)


def can_update(shell: Any) -> bool:
    """Whether the front end can update an output in place (a kernel or a capture, not a terminal)."""
    return type(shell.display_pub) is not DisplayPublisher


class Live:
    """One output, shown at the first update and then updated in place at most once per ``interval``
    seconds (final updates always pass). Where outputs cannot be updated (a terminal), only the final
    bundle is shown; an empty bundle shows nothing.
    """

    def __init__(self, live: bool, interval: float = 0.1):
        self.live, self.interval = live, interval
        self._last = 0.0
        self._handle: Any = None

    def update(self, bundle: dict, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < self.interval:
            return
        self._last = now
        if self._handle is not None:
            self._handle.update(bundle or {"text/plain": ""}, raw=True)
        elif bundle and (self.live or final):
            self._handle = display(bundle, raw=True, display_id=self.live or None)


def size(n: int | None) -> str:
    """Bytes as ``12.3 MiB``."""
    if n is None:
        return NONE
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return NONE


def every(seconds: float = 0.1) -> Callable[[bool], bool]:
    """A gate for a progress line: ``due(last)`` is true at most once per ``seconds``, and always when ``last``."""
    shown = [0.0]

    def due(last: bool) -> bool:
        if not last and time.monotonic() - shown[0] < seconds:
            return False
        shown[0] = time.monotonic()
        return True

    return due


def hit_rate(m: Any) -> str:
    """A model's prompt-cache hit rate (a :class:`~mlx_manager_nb.registry.ModelInfo`) as
    ``75% of 4 (2 memory, 1 disk)``; empty before its first prompt."""
    if m.hit_rate is None:
        return ""
    return f"{m.hit_rate:.0%} of {m.prompt_lookups} ({m.memory_hits} memory, {m.disk_hits} disk)"


def seconds(s: float | None) -> str:
    """A duration as ``850 ms``, ``12 s``, ``5 min`` or ``2.0 h``; None as ``forever``."""
    if s is None:
        return "forever"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.0f} s"
    return f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def ago(epoch: float) -> str:
    return f"{seconds(max(0.0, time.time() - epoch))} ago"


def local_time(iso: str | None) -> str:
    """ISO-8601 UTC text as local ``YYYY-MM-DD HH:MM:SS``."""
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S") if iso else NONE
