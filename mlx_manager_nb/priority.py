"""Threads that yield the CPU to the engine: untrusted work (grammar compiles, schema checks) runs at a
lower OS priority, so on a busy CPU a client's schemas slow that client, not everyone's decode steps."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

BACKGROUND_NICE = 10  # added to the niceness of such threads (Linux, where each thread has its own)


def lower_this_thread() -> None:
    """Lower the calling thread's priority by :data:`BACKGROUND_NICE` (a pool's initializer; Linux only:
    elsewhere a thread id is not what ``setpriority`` takes, and nothing changes)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE)
