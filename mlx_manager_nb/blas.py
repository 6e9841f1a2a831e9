"""Bind an optimized BLAS for MLX on Linux, before ``mlx`` is first imported.

The Linux ``mlx[cpu]`` wheel links the reference BLAS (about 5 GFLOPS for a 1024² float32 matmul).
MLX resolves ``cblas_sgemm`` and the LAPACK routines when ``mlx.core`` is loaded, so loading
OpenBLAS with ``RTLD_GLOBAL`` first makes MLX use it (150-190 GFLOPS on two cores).

OpenBLAS comes from PyPI's ``ngsolve-openblas`` (BSD-3, 13 MB): it exports the standard symbol names
and needs ``libgfortran.so.5``, which a fresh machine lacks but the ``mlx[cpu]`` wheel carries under
a mangled name; symlinks in a temporary folder let OpenBLAS find it. Where any of this is missing,
MLX runs as before and :data:`status` says why.

Threads: OpenBLAS starts one thread per core by default, and its threads spin-wait; when other work
shares the CPU (another process, the notebook, a second model) a single stream then slows 3-15x,
while one thread costs a batch about 30% on an idle machine. So unless ``MLX_NB_BLAS_THREADS`` or the
user's own ``OPENBLAS_NUM_THREADS`` fixes the count, the engine sets it for each step from the work
and the CPU's state (:func:`fit_threads`): :data:`DEFAULT_THREADS` while one row decodes, one per core
for prefill and batches, unless other processes kept the CPU busy over the last
:data:`CONTENTION_SECONDS` (``benchmarks/cpu.py --threads`` measures the choices).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

from . import gemv

#: What happened: "openblas: PATH", or the reason the fast path is not in use.
status = "not attempted"
#: How one-row products run: "sgemv" (see :mod:`~mlx_manager_nb.gemv`), or "off (why)".
gemv_status = "off (OpenBLAS not bound)"
#: OpenBLAS threads when neither MLX_NB_BLAS_THREADS nor OPENBLAS_NUM_THREADS is set.
DEFAULT_THREADS = 1
#: How often the CPU time of other processes is measured (seconds), for :func:`fit_threads`.
CONTENTION_SECONDS = 1.0
#: Where the thread count in force came from, for doctor().
threads_source = "not set"
#: The thread count :func:`fit_threads` last chose for each kind of work ("one row", "wide").
chosen: dict[str, int] = {}
_handle: ctypes.CDLL | None = None
_adaptive = False
_contention = {"at": 0.0, "busy": 0.0, "ours": 0.0, "others": 0.0}  # the last measurement of /proc/stat


def _find(package: str, pattern: str) -> list[str]:
    """Files matching ``pattern`` (relative to a folder holding ``package``), without importing it."""
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec else []
    return sorted({f for folder in folders for f in glob.glob(os.path.join(folder, pattern))})


def bind() -> str:
    """Load OpenBLAS globally so that MLX binds to it; return (and keep in ``status``) what happened."""
    global status, gemv_status, _handle
    if _handle is not None or sys.platform != "linux":
        status = status if _handle is not None else "system default (Accelerate on macOS)"
        return status
    if os.environ.get("MLX_NB_BLAS", "").lower() == "reference":
        status = "reference BLAS (MLX_NB_BLAS=reference)"
        return status
    if "mlx.core" in sys.modules:
        status = "reference BLAS: mlx was imported before mlx_manager_nb, so the fast BLAS could not be bound"
        warnings.warn(f"{status}. Import mlx_manager_nb first (restart the kernel) for 10-30x faster CPU "
                      "inference.", RuntimeWarning, stacklevel=3)
        return status
    blas = _find("ngsolve_openblas", "libopenblas*.so*")
    gfortran = _find("mlx", os.path.join("..", "mlx_cpu.libs", "libgfortran*.so*"))
    if len(blas) != 1 or len(gfortran) != 1:
        missing = "ngsolve-openblas is not installed" if not blas else "mlx[cpu] carries no libgfortran"
        status = f"reference BLAS: {missing}"
        warnings.warn(f"{status}; MLX runs on the slow reference BLAS. `pip install ngsolve-openblas` "
                      "fixes it on x86-64 Linux.", RuntimeWarning, stacklevel=3)
        return status
    _set_threads()
    try:
        ctypes.CDLL(gfortran[0], mode=ctypes.RTLD_GLOBAL)
        with tempfile.TemporaryDirectory() as tmp:  # OpenBLAS looks for libgfortran.so.5 beside itself
            shim = gemv.build(tmp)  # first: its cblas_sgemm is the one MLX finds
            os.symlink(gfortran[0], os.path.join(tmp, "libgfortran.so.5"))
            os.symlink(blas[0], os.path.join(tmp, "libopenblas.so.0"))
            _handle = ctypes.CDLL(os.path.join(tmp, "libopenblas.so.0"), mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        status = f"reference BLAS: loading OpenBLAS failed ({e})"
        warnings.warn(status, RuntimeWarning, stacklevel=3)
        return status
    if isinstance(shim, str):
        gemv_status = shim
    else:
        gemv.connect(shim, _handle)
        gemv_status = "sgemv"
    status = f"openblas: {blas[0]}"
    return status


def _set_threads() -> None:
    """Set OPENBLAS_NUM_THREADS, which OpenBLAS reads when it is loaded."""
    global threads_source, _adaptive
    if os.environ.get("MLX_NB_BLAS_THREADS"):
        os.environ["OPENBLAS_NUM_THREADS"] = os.environ["MLX_NB_BLAS_THREADS"]
        threads_source = "MLX_NB_BLAS_THREADS"
    elif os.environ.get("OPENBLAS_NUM_THREADS"):
        threads_source = "OPENBLAS_NUM_THREADS"
    else:
        os.environ["OPENBLAS_NUM_THREADS"] = str(DEFAULT_THREADS)
        _adaptive = True
        threads_source = (f"default: {DEFAULT_THREADS} while one row decodes, up to {_cores()} for prefill and "
                          "batches while the CPU is free (MLX_NB_BLAS_THREADS or OPENBLAS_NUM_THREADS fix it)")


def threads() -> int | None:
    """The number of threads the bound OpenBLAS uses; None where none is bound."""
    return _handle.openblas_get_num_threads() if _handle is not None else None


def adaptive() -> bool:
    """Whether :func:`fit_threads` sets the thread count (an OpenBLAS is bound and no count was fixed)."""
    return _handle is not None and _adaptive


def fit_threads(wide: bool, before_change: Callable[[], None] = lambda: None) -> int | None:
    """Set OpenBLAS's thread count for the next step (the engine thread calls it): ``wide`` work (a
    prefill, a batch of several rows) gets one thread per core that other processes leave free, one
    decoding row :data:`DEFAULT_THREADS`. ``before_change`` runs first when the count changes (the engine
    waits there for the MLX work in flight). Returns the count; None where it is not the library's to set."""
    if _handle is None or not adaptive():
        return None
    n = max(1, min(_cores(), int(_cores() - _others_busy() + 0.5))) if wide else DEFAULT_THREADS
    chosen["wide" if wide else "one row"] = n
    if n != _handle.openblas_get_num_threads():
        before_change()
        _handle.openblas_set_num_threads(n)
    return n


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _others_busy() -> float:
    """Cores' worth of CPU time other processes used over the last :data:`CONTENTION_SECONDS`, measured
    at most that often: all CPU time from /proc/stat less this process's (0 where it cannot tell)."""
    now = time.monotonic()
    if now - _contention["at"] < CONTENTION_SECONDS:
        return _contention["others"]
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:9]]  # user .. steal (guest time is in user)
    except (OSError, ValueError):
        return 0.0
    busy = (sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)) / os.sysconf("SC_CLK_TCK")
    times = os.times()
    ours = times.user + times.system
    if _contention["at"]:
        elapsed = now - _contention["at"]
        _contention["others"] = max(0.0, (busy - _contention["busy"]) - (ours - _contention["ours"])) / elapsed
    _contention.update(at=now, busy=busy, ours=ours)
    return _contention["others"]


def bound_library() -> str | None:
    """The file whose BLAS MLX calls (Linux; None where it cannot tell): the one providing ``cblas_sgemm``,
    or behind the one-row shim (:mod:`~mlx_manager_nb.gemv`), the one it forwards to."""
    path = _providing("cblas_sgemm")
    return _providing("cblas_sgemv") if path and os.path.basename(path) == gemv.NAME else path


def _providing(symbol: str) -> str | None:
    try:
        address = ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p).value
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split()
                start, end = (int(x, 16) for x in parts[0].split("-"))
                if address is not None and start <= address < end and len(parts) >= 6:
                    return parts[5]
    except (AttributeError, OSError, ValueError):
        pass
    return None
