"""mlx_manager_nb: run, serve and watch local MLX language models from a Jupyter notebook.

>>> from mlx_manager_nb import pool
>>> pool.load("demo")
>>> pool.chat([{"role": "user", "content": "Hi!"}]).text

``pool`` (the kernel-wide model pool) and ``audit`` (its request log) are created on first use.
In IPython: ``%load_ext mlx_manager_nb``, then ``%mlx`` and ``%%chat``.
"""

from typing import Any

from . import blas

blas.bind()  # must run before anything imports mlx: MLX binds its BLAS when it is loaded

from .errors import (  # noqa: E402
    DemoModelUnavailableError,
    EngineError,
    InvalidModelError,
    MLXManagerError,
    ModelNotFoundError,
    PoolFullError,
    UnsupportedModelError,
)

__version__ = "0.1.0"
_defaults: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    """Create the default ``pool`` and ``audit`` log lazily, so importing touches no file."""
    if name == "audit":
        if "audit" not in _defaults:
            from .audit_log import AuditLog

            _defaults["audit"] = AuditLog()
        return _defaults["audit"]
    if name == "pool":
        if "pool" not in _defaults:
            from .model_pool import Pool

            _defaults["pool"] = Pool(audit=__getattr__("audit"))
        return _defaults["pool"]
    if name == "dashboard":
        from .widgets import dashboard

        return dashboard
    if name == "doctor":
        from .doctor import doctor

        return doctor
    raise AttributeError(f"module 'mlx_manager_nb' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext mlx_manager_nb``: register the ``%mlx`` and ``%%chat`` magics."""
    from .magics import load

    load(ipython)


__all__ = [
    "DemoModelUnavailableError",
    "EngineError",
    "InvalidModelError",
    "MLXManagerError",
    "ModelNotFoundError",
    "PoolFullError",
    "UnsupportedModelError",
    "audit",
    "dashboard",
    "doctor",
    "pool",
]
