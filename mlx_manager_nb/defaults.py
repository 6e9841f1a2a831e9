"""The process-wide default pool and audit log: the one place that creates and resets them.

Everything that falls back to "the kernel's pool" (the package root, magics, widgets, ``serve()``,
``doctor()``) calls :func:`default_pool` / :func:`default_audit`. Nothing is created, and no file
touched, until first use.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .audit_log import AuditLog
    from .model_pool import Pool

_lock = threading.RLock()
_pool: Pool | None = None
_audit: AuditLog | None = None


def default_audit() -> AuditLog:
    """The audit log at ``$MLX_NB_HOME/audit.db``, created on first use."""
    global _audit
    with _lock:
        if _audit is None:
            from .audit_log import AuditLog

            _audit = AuditLog()
        return _audit


def default_pool() -> Pool:
    """The kernel-wide pool, recording into :func:`default_audit`, created on first use."""
    global _pool
    with _lock:
        if _pool is None:
            from .model_pool import Pool

            _pool = Pool(audit=default_audit())
        return _pool


def existing_pool() -> Pool | None:
    """The default pool if it was created, without creating it."""
    return _pool


def reset_defaults() -> None:
    """Close the default pool (unloading its models) and audit log; the next use creates new ones."""
    global _pool, _audit
    with _lock:
        pool, audit, _pool, _audit = _pool, _audit, None, None
    if pool is not None:
        pool.close()
    if audit is not None:
        audit.close()
