"""A throwaway ``MLX_NB_HOME`` for the demo command, the benchmarks and the test suite, so that they
never write into the user's own (their models, ``audit.db``, ``responses.db``).

The demo models are fetched and imported once into a cache folder and linked into each scratch home,
so a second run imports nothing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from platformdirs import user_cache_dir

from .store import Progress

CACHE_VARIABLE = "MLX_NB_DEMO_CACHE"


def demo_cache() -> Path:
    """Where demo models are kept for scratch homes: ``$MLX_NB_DEMO_CACHE``, else ``mlx_manager_nb-demo``
    in the user cache folder."""
    return Path(os.environ.get(CACHE_VARIABLE) or user_cache_dir("mlx_manager_nb-demo")).expanduser()


def link_demo_models(home: Path, cache: Path, names: Sequence[str] = ("demo",),
                     progress: Progress | None = None) -> None:
    """Import each demo model (``"demo"``, ``"demo-embed"``) into ``cache`` once, under a lock so that
    concurrent runs import it once, and link it into ``home``'s store."""
    from .demo import ensure_demo
    from .demo_embed import ensure_demo_embed

    ensure = {"demo": ensure_demo, "demo-embed": ensure_demo_embed}
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock, _home(cache):  # the store functions read MLX_NB_HOME
        fcntl.flock(lock, fcntl.LOCK_EX)
        stored = [ensure[name](progress) for name in names]
    for path in stored:
        link = home / "models" / path.name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path, target_is_directory=True)


@contextmanager
def scratch_home(names: Sequence[str] = ("demo",), progress: Progress | None = None) -> Iterator[Path]:
    """Run the block with ``MLX_NB_HOME`` set to a new temporary folder holding the demo models
    ``names``; child processes started meanwhile (kernels) inherit it. The folder is removed after."""
    home = Path(tempfile.mkdtemp(prefix="mlx-nb-scratch-"))
    try:
        link_demo_models(home, demo_cache(), names, progress)
        with _home(home):
            yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def _home(path: Path) -> Iterator[None]:
    """``MLX_NB_HOME`` set to ``path`` for the block, then restored."""
    saved = os.environ.get("MLX_NB_HOME")
    os.environ["MLX_NB_HOME"] = str(path)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("MLX_NB_HOME", None)
        else:
            os.environ["MLX_NB_HOME"] = saved
