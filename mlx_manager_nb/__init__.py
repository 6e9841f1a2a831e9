"""mlx_manager_nb: run, serve and watch local MLX language models from a Jupyter notebook.

>>> from mlx_manager_nb import pool
>>> pool.load("demo")
>>> pool.chat([{"role": "user", "content": "Hi!"}]).text

``pool`` (the kernel-wide model pool) and ``audit`` (its request log) are created on first use.
In IPython: ``%load_ext mlx_manager_nb``, then ``%mlx`` and ``%%chat``.
"""

from typing import Any

from .errors import (
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
    raise AttributeError(f"module 'mlx_manager_nb' has no attribute {name!r}")


__all__ = [
    "DemoModelUnavailableError",
    "EngineError",
    "InvalidModelError",
    "MLXManagerError",
    "ModelNotFoundError",
    "PoolFullError",
    "UnsupportedModelError",
    "audit",
    "pool",
]
