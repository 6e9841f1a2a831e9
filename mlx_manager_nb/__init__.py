"""mlx_manager_nb: run, serve and watch local MLX language models from a Jupyter notebook.

>>> from mlx_manager_nb import pool
>>> pool.load("demo")
>>> pool.chat([{"role": "user", "content": "Hi!"}]).text

Every public name lives here and is imported on first use, so ``import mlx_manager_nb`` stays
light and touches no file: ``pool`` (the kernel-wide model pool) and ``audit`` (its request log)
are created when first used. In IPython: ``%load_ext mlx_manager_nb``, then ``%mlx`` and ``%%chat``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import blas, shutdown  # noqa: F401  (shutdown: the one exit hook, servers -> engines -> audit)

blas.bind()  # must run before anything imports mlx: MLX binds its BLAS when it is loaded

from .errors import (  # noqa: E402
    DemoModelUnavailableError,
    EngineError,
    InvalidModelError,
    MLXManagerError,
    ModelNotFoundError,
    PoolFullError,
    ServerError,
    UnsupportedModelError,
)

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time these load on first use
    from .audit_log import AuditLog
    from .diagnostics import doctor
    from .logprobs import TokenLogprob, TopLogprob
    from .model_pool import ModelInfo, Pool
    from .scoring import Score
    from .scratch import scratch_home
    from .server import Server, create_app, serve
    from .store import import_gguf, list_local_models
    from .streams import Result, TextStream
    from .tools import Tool, ToolCall
    from .widgets import dashboard

    pool: Pool
    audit: AuditLog

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "AuditLog": "audit_log",
    "doctor": "diagnostics",
    "ModelInfo": "model_pool",
    "Pool": "model_pool",
    "scratch_home": "scratch",
    "Server": "server",
    "create_app": "server",
    "serve": "server",
    "import_gguf": "store",
    "list_local_models": "store",
    "Result": "streams",
    "Score": "scoring",
    "TextStream": "streams",
    "TokenLogprob": "logprobs",
    "TopLogprob": "logprobs",
    "Tool": "tools",
    "ToolCall": "tools",
    "dashboard": "widgets",
}


def __getattr__(name: str) -> Any:
    if name == "pool":
        from .defaults import default_pool

        return default_pool()
    if name == "audit":
        from .defaults import default_audit

        return default_audit()
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'mlx_manager_nb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext mlx_manager_nb``: register the ``%mlx`` and ``%%chat`` magics."""
    from .magics import load

    load(ipython)


__all__ = [
    "AuditLog",
    "DemoModelUnavailableError",
    "EngineError",
    "InvalidModelError",
    "MLXManagerError",
    "ModelInfo",
    "ModelNotFoundError",
    "Pool",
    "PoolFullError",
    "Result",
    "Score",
    "Server",
    "ServerError",
    "TextStream",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "TopLogprob",
    "UnsupportedModelError",
    "__version__",
    "audit",
    "create_app",
    "dashboard",
    "doctor",
    "import_gguf",
    "list_local_models",
    "pool",
    "scratch_home",
    "serve",
]
