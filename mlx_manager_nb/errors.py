"""Exception types: each failure a user can cause has its own, with a message naming what is wrong."""


class MLXManagerError(Exception):
    """Base class for every error this library raises on purpose."""


class ModelNotFoundError(MLXManagerError, LookupError):
    """A model reference matches nothing: no path, store entry, cached repo or loaded model."""


class InvalidModelError(MLXManagerError, ValueError):
    """A model folder or file exists but cannot be used (missing config, tokenizer, corrupt weights)."""


class UnsupportedModelError(InvalidModelError):
    """A model uses an architecture, tensor type or tokenizer this library does not support."""


class DemoModelUnavailableError(MLXManagerError):
    """The demo model is not cached and cannot be fetched (offline)."""


class PoolFullError(MLXManagerError):
    """Loading would exceed the pool's limits and nothing can be evicted."""


class EngineError(MLXManagerError):
    """A failure inside the inference engine."""


class ServerError(MLXManagerError):
    """The HTTP server cannot start or stop as asked (port in use, already running, unsafe bind)."""


class InvalidParameterError(MLXManagerError, ValueError):
    """A request parameter is invalid; ``param`` names it (``"temperature"``, ``"messages[2].role"``)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidParameterError):
    """The prompt (with ``max_tokens``) does not fit the model's context: ``tokens`` > ``limit``."""

    def __init__(self, param: str, message: str, tokens: int, limit: int):
        super().__init__(param, message)
        self.tokens, self.limit = tokens, limit
