# ruff: noqa: I001  (mlx_manager_nb is imported before mlx: it binds the fast BLAS)
"""What the benchmarks share: the demo model, one prompt of about 42 tokens, and timing helpers.

Run each benchmark by hand from the repository root, on an otherwise idle machine:
``.venv/bin/python benchmarks/engine.py`` (see each file's docstring). They run in a scratch
``MLX_NB_HOME`` (the demo models linked from the demo cache), never in the user's.
"""

from __future__ import annotations

import atexit
import contextlib
import statistics
import threading
import time
from collections.abc import Callable

# Registered before the package's own exit hook, so it runs after it (atexit is last in, first out):
# servers, engines and audit logs are closed before their scratch home goes.
_scratch = contextlib.ExitStack()
atexit.register(_scratch.close)

import mlx_manager_nb  # first: binds the fast BLAS before mlx loads  # noqa: F401, E402
from mlx_manager_nb.scratch import scratch_home  # noqa: E402

import mlx.core as mx  # noqa: E402

if mx.default_device().type == mx.DeviceType.cpu:
    # The pool turns mx.compile off on CPU (it recompiles C++ for each new shape); raw mlx-lm runs the
    # same way here so that both sides measure steady-state work on the same settings.
    mx.disable_compile()

PROMPT = ("Write a long, vivid story about a lighthouse keeper who finds a mysterious map in a bottle. "
          "Describe the island, the storm and the treasure in detail.")
MAX_TOKENS = 128


def messages(i: int = 0) -> list[dict]:
    suffix = "" if i == 0 else f" (Variation {i}.)"
    return [{"role": "user", "content": PROMPT + suffix}]


_scratch.enter_context(scratch_home(("demo", "demo-embed")))


def demo_path():
    from mlx_manager_nb.store import resolve

    return resolve("demo")


def concurrently(n: int, fn: Callable[[int], int]) -> float:
    """Run fn(0..n-1) in n threads; return aggregate tokens per second (total tokens / wall time)."""
    counts = [0] * n

    def run(i: int) -> None:
        counts[i] = fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def best_of(runs: int, fn: Callable[[], float]) -> float:
    """The median of several runs (the first one, a warm-up, is dropped)."""
    fn()
    return statistics.median(fn() for _ in range(runs))


def row(label: str, value: float, unit: str, ratio: float | None = None, target: float | None = None) -> None:
    text = f"  {label:44} {value:9.2f} {unit}"
    if ratio is not None:
        verdict = "" if target is None else ("  ok" if ratio >= target else f"  BELOW target {target}")
        text += f"   ratio {ratio:5.2f}{verdict}"
    print(text, flush=True)


def bandwidth() -> float:
    """Memory bandwidth in bytes/s: a 256 MiB numpy copy (read + write), best of 5."""
    import numpy as np

    src = np.ones(1 << 26, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def linear_weights(model) -> list[mx.array]:
    """The weight matrices one decoding step multiplies by: every linear layer and the output projection."""
    import mlx.nn as nn

    weights = [m.weight for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    if getattr(model.args, "tie_word_embeddings", False):
        weights.append(model.model.embed_tokens.weight)
    return weights
