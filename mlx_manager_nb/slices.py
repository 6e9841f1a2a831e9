"""Background work on the engine thread, in bounded slices between decode steps.

A job is a generator: it starts with ``budget = yield`` and, each time it is resumed, gets the seconds
it may use now, does one piece of work sized to them and yields again; it ends by returning. The
engine gives background work one slice per loop while any sequence decodes, of about one decode
step's time (the median of the last steps, at least :data:`SLICE_FLOOR`), so a running stream's
inter-token gap stays near twice its quiet one whatever else runs; when nothing decodes a slice may
take :data:`IDLE_SLICE`, and the engine still looks at its inbox between slices. Jobs of the highest
priority take turns, round-robin; lower ones wait until those are done.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass

Job = Generator[None, float, None]

SLICE_FLOOR = 0.02  # seconds: the least time a slice gets beside decoding streams
IDLE_SLICE = 0.25  # seconds a slice may take when nothing decodes
STEP_WINDOW = 16  # decode steps whose median is a slice's budget


@dataclass
class _Entry:
    job: Job
    priority: int


class Slices:
    """The engine's background jobs and the recent decode-step times that size their slices (engine thread)."""

    def __init__(self) -> None:
        self._jobs: deque[_Entry] = deque()
        self._steps: deque[float] = deque(maxlen=STEP_WINDOW)

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def add(self, job: Job, priority: int = 0) -> None:
        """Start ``job`` (it runs up to its first ``yield``) and give it slices from the next loop on."""
        try:
            next(job)
        except StopIteration:
            return
        self._jobs.append(_Entry(job, priority))

    def step_took(self, seconds: float) -> None:
        """Record how long a decode step took."""
        self._steps.append(seconds)

    def budget(self, decoding: bool) -> float:
        """Seconds the next slice may take."""
        if not decoding:
            return IDLE_SLICE
        return max(SLICE_FLOOR, statistics.median(self._steps) if self._steps else SLICE_FLOOR)

    def run(self, budget: float) -> None:
        """One slice of the next job in turn among those of the highest priority."""
        top = max(e.priority for e in self._jobs)
        entry = next(e for e in self._jobs if e.priority == top)
        self._jobs.remove(entry)
        try:
            entry.job.send(budget)
        except StopIteration:
            return
        self._jobs.append(entry)

    def close(self) -> None:
        """End every job (each one's ``finally`` runs)."""
        while self._jobs:
            self._jobs.popleft().job.close()
