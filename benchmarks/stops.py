"""The cost of stop-string matching on the engine thread: the old quadratic matcher against today's.

    .venv/bin/python benchmarks/stops.py

Feeds N four-character tokens that never complete the stop string but keep almost all of it
pending (the worst case for hold-back), with one long stop string, and prints the time per run
and the ratio. "before" is a copy of the matcher this library shipped until the change that made
matching linear; it checked ``pending.endswith(s[:n])`` for every n. No model or MLX is involved.
"""

import time

from mlx_manager_nb.stops import StopMatcher


class OldStopMatcher:
    """The former algorithm, kept here only to measure it."""

    def __init__(self, stops):
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, text):
        self.pending += text
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


def run(matcher_class, stop: str, tokens: list[str]) -> float:
    m = matcher_class([stop])
    start = time.perf_counter()
    for t in tokens:
        m.feed(t)
    return time.perf_counter() - start


def main() -> None:
    for length, n in ((1_000, 200), (10_000, 200), (100_000, 20)):
        stop = "a" * (length - 1) + "b"  # the text is all "a": every token extends the pending prefix
        tokens = ["aaaa"] * n
        before = run(OldStopMatcher, stop, tokens)
        after = run(StopMatcher, stop, tokens)
        print(f"stop of {length:>7,} chars, {n:>4} tokens: before {before * 1000:9.1f} ms, "
              f"after {after * 1000:7.2f} ms, ratio {before / after:8.0f}x", flush=True)


if __name__ == "__main__":
    main()
