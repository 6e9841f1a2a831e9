"""Interpreter exit, in order: servers stop (in-flight requests get a short drain, the rest are
cancelled), engines end what is still running as cancelled, then audit logs write every row.

One hook, registered when the package is imported, so the order does not depend on which of
these happened to be created first.
"""

from __future__ import annotations

import atexit
import sys

EXIT_DRAIN = 2.0  # seconds in-flight HTTP requests get to finish at exit


def at_exit() -> None:
    if (servers := sys.modules.get("mlx_manager_nb.server.lifecycle")) is not None:
        servers.stop_all(EXIT_DRAIN)
    if (engine := sys.modules.get("mlx_manager_nb.engine")) is not None:
        engine.stop_all()
    if (audit := sys.modules.get("mlx_manager_nb.audit_log")) is not None:
        audit.close_all()


atexit.register(at_exit)
