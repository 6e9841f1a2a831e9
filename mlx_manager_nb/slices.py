"""Background work on the engine thread, in bounded slices between decode steps.

A job is a generator: it starts with ``budget = yield`` and, each time it is resumed, gets the seconds
it may use now, does one piece of work sized to them and yields again; it ends by returning.

While any sequence decodes, a slice gets about one decode step's time (the median of the last steps,
at least :data:`SLICE_FLOOR`), and background work gets a share of the decode steps' time:
:data:`BACKGROUND_SHARE` (a slice after every second step) while the sequences decoding are those of
the jobs' own clients, :data:`FAIR_SHARE` (a slice after every third) while another client's stream
decodes beside them. That client's inter-token gap thus stays near twice its quiet one, and its total
time near 1.33 times, whatever else runs; a client's own streams wait more for its own work. A round
whose decode step ran long (over :data:`LONG_STEP` times the median: the CPU is busy) puts its slice
off to a later round, so no gap gets both a slow step and a slice. When
nothing decodes a slice may take :data:`IDLE_SLICE`, one after the other, and the engine still looks at
its inbox between them.
Jobs of the highest priority take turns, round-robin; lower ones wait until those are done.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass

Job = Generator[None, float, None]

SLICE_FLOOR = 0.02  # seconds: the least time a slice gets beside decoding streams
IDLE_SLICE = 1.0  # seconds a slice may take when nothing decodes (the longest a new request waits to start)
STEP_WINDOW = 16  # decode steps whose median is a slice's budget
BACKGROUND_SHARE = 0.5  # seconds of background work per second of decode steps, while its own clients decode
# ... while another client decodes beside it: its stream's total time is then at most about 1 + this
FAIR_SHARE = 1 / 3
LONG_STEP = 1.5  # a decode step longer than this times the median has no slice after it in its round


def pause(start: float, budget: float, need: float = 0.0) -> Generator[None, float, tuple[float, float]]:
    """Inside a job, before a piece of work: end the slice once ``budget`` seconds have passed since ``start``
    (or fewer than ``need``, the least piece's time, are left), and give back the (start, budget) to go on
    with: ``start, budget = yield from pause(start, budget)``."""
    if time.perf_counter() - start + need < budget:
        return start, budget
    budget = yield
    return time.perf_counter(), budget


@dataclass
class _Entry:
    job: Job
    priority: int
    client: str | None  # whose work it is (None: the notebook's, or nobody's in particular)


class Slices:
    """The engine's background jobs and the recent decode-step times that size their slices (engine thread)."""

    def __init__(self) -> None:
        self._jobs: deque[_Entry] = deque()
        self._steps: deque[float] = deque(maxlen=STEP_WINDOW)
        self._credit = 0.0  # seconds of background work due to the jobs beside decoding
        self._long = False  # the last decode step ran long: its round takes no slice

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def add(self, job: Job, priority: int = 0, client: str | None = None) -> None:
        """Start ``job`` (it runs up to its first ``yield``) and give it slices from the next loop on;
        ``client``: whose work it is (see :meth:`step_took`)."""
        try:
            next(job)
        except StopIteration:
            return
        self._jobs.append(_Entry(job, priority, client))

    def step_took(self, seconds: float, clients: frozenset[str | None] | set[str | None] = frozenset()) -> None:
        """Record how long a decode step took: background work is owed its share of it (at most a slice),
        the smaller :data:`FAIR_SHARE` when the step decoded for ``clients`` other than the jobs' own."""
        self._long = bool(self._steps) and seconds > LONG_STEP * self._budget(True)
        self._steps.append(seconds)
        others = bool(clients) and not clients <= {e.client for e in self._jobs}
        share = FAIR_SHARE if others else BACKGROUND_SHARE
        self._credit = min(self._credit + share * seconds, self._budget(True))

    def others_than(self, client: str | None) -> bool:
        """Whether background work of another client than ``client`` is queued."""
        return any(e.client != client for e in self._jobs)

    def step_time(self) -> float | None:
        """The median of the last decode steps' times (None before the first)."""
        return statistics.median(self._steps) if self._steps else None

    def _budget(self, decoding: bool) -> float:
        if not decoding:
            return IDLE_SLICE
        return max(SLICE_FLOOR, statistics.median(self._steps) if self._steps else SLICE_FLOOR)

    def run(self, decoding: bool) -> None:
        """One slice of the next job in turn among those of the highest priority, if one is due: always when
        nothing decodes, else when the decode steps since the last slice owe it and the last one was not long."""
        if decoding and (self._credit <= 0 or self._long):
            return
        top = max(e.priority for e in self._jobs)
        entry = next(e for e in self._jobs if e.priority == top)
        self._jobs.remove(entry)
        start = time.perf_counter()
        try:
            entry.job.send(self._budget(decoding))
        except StopIteration:
            return
        finally:
            self._credit = self._credit - (time.perf_counter() - start) if decoding else 0.0
        self._jobs.append(entry)

    def close(self) -> None:
        """End every job (each one's ``finally`` runs)."""
        while self._jobs:
            self._jobs.popleft().job.close()
