"""``doctor()``: what MLX runs on here, how fast its BLAS is, and the settings in force.

>>> from mlx_manager_nb import doctor
>>> doctor()["gflops"]
172.4
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any

from . import blas, store


def _gflops(n: int = 1024, repeats: int = 10) -> float:
    import mlx.core as mx

    a = mx.random.normal((n, n))
    mx.eval(a @ a)
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ a)
    return round(2 * n**3 * repeats / (time.perf_counter() - start) / 1e9, 1)


def doctor(pool: Any = None) -> dict:
    """A report on this machine and the pool's settings; the GFLOPS figure is measured on the engine thread."""
    import mlx.core as mx
    import mlx_lm

    from .defaults import default_pool
    from .model_pool import physical_memory

    pool = pool if pool is not None else default_pool()
    device = mx.default_device()
    return {
        "mlx": getattr(mx, "__version__", "unknown"),
        "mlx_lm": mlx_lm.__version__,
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "device": "GPU (Metal)" if device.type == mx.DeviceType.gpu else "CPU",
        "blas": blas.status,
        "blas_library": blas.bound_library(),
        "blas_one_row": blas.gemv_status,  # one-row products: through sgemv (see mlx_manager_nb.gemv), or why not
        "blas_threads": f"{blas.threads()} ({blas.threads_source})" if blas.threads() else "n/a",
        "blas_threads_by_work": dict(blas.chosen),  # what the engine last set for one decoding row and wide work
        "gflops": pool.engine.run(_gflops).result(),
        "mx.compile": "on" if os.environ.get("MLX_NB_COMPILE") == "1" or device.type == mx.DeviceType.gpu
        else "off on CPU (MLX_NB_COMPILE=1 turns it on)",
        "cpu_count": os.cpu_count(),
        "physical_memory": physical_memory(),
        "memory_used": pool.memory_used(),
        "max_memory": pool.max_memory,
        "max_models": pool.max_models,
        "keep_alive": pool.keep_alive,
        "dequantize": {None: "auto (on CPU when it fits)", True: "always", False: "never"}[pool.dequantize],
        "home": str(store.home()),
    }
