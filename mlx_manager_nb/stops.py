"""Stop strings matched on decoded text, across token boundaries, with hold-back.

Text that could still be the start of a stop string is held back until it is known not to be,
so no part of a stop string ever reaches the consumer.

Matching is incremental and linear: each stop string runs a Knuth-Morris-Pratt automaton whose
state is the length of the longest suffix of the text so far that is a prefix of that stop, so a
feed costs O(len(text) * len(stops)) however long the stops are, and the held-back text is at
most the longest stop string minus one character.

>>> m = StopMatcher(["</end>"])
>>> m.feed("Hello </e"), m.feed("nd> more")
(('Hello ', None), ('', '</end>'))
"""

from __future__ import annotations


def _prefix_function(s: str) -> list[int]:
    """``f[i]``: the length of the longest proper prefix of ``s[:i + 1]`` that is also its suffix."""
    f = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class StopMatcher:
    def __init__(self, stops: tuple[str, ...] | list[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self._fail = [_prefix_function(s) for s in self.stops]
        self._state = [0] * len(self.stops)

    def feed(self, text: str) -> tuple[str, str | None]:
        """Add decoded text; return (text safe to emit, the stop string that matched or None).

        When several stops match, the one starting first wins (the shorter one on a tie).
        """
        start = len(self.pending)
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, None
        hit: tuple[int, str] | None = None
        for j, s in enumerate(self.stops):
            k, fail = self._state[j], self._fail[j]
            for i, c in enumerate(text):
                while k and c != s[k]:
                    k = fail[k - 1]
                if c == s[k]:
                    k += 1
                if k == len(s):
                    at = start + i + 1 - k
                    hit = min(hit, (at, s)) if hit else (at, s)
                    break
            self._state[j] = k
        if hit is not None:
            out, self.pending = self.pending[:hit[0]], ""
            return out, hit[1]
        cut = len(self.pending) - max(self._state)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, None

    def flush(self) -> str:
        """The held-back text, once generation ended without a match."""
        out, self.pending = self.pending, ""
        return out
