"""Stop strings matched on decoded text, across token boundaries, with hold-back.

Text that could still be the start of a stop string is held back until it is known not to be,
so no part of a stop string ever reaches the consumer.

>>> m = StopMatcher(["</end>"])
>>> m.feed("Hello </e"), m.feed("nd> more")
(('Hello ', None), ('', '</end>'))
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add decoded text; return (text safe to emit, the stop string that matched or None)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, None
        hits = [(self.pending.find(s), s) for s in self.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            i, s = min(hits)
            out, self.pending = self.pending[:i], ""
            return out, s
        hold = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, None

    def flush(self) -> str:
        """The held-back text, once generation ended without a match."""
        out, self.pending = self.pending, ""
        return out
