"""``python -m mlx_manager_nb lab``: JupyterLab on working copies of the repository's notebooks.

Running a notebook saves its outputs and widget state into the file, so the lab never opens the
committed ``notebooks/``: they are copied into a working folder (``lab/``, ignored by git) and
JupyterLab starts there. Only files the folder lacks are copied, so edits made there survive the
next start; delete a copy (or the folder) to get the repository's version back.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

from mlx_manager_nb.errors import MLXManagerError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
FIRST = "01_quickstart.ipynb"


def copy_missing(source: Path, work: Path) -> list[Path]:
    """Copy every file under ``source`` that ``work`` lacks; return the copies made."""
    copied = []
    for path in sorted(source.rglob("*")):
        target = work / path.relative_to(source)
        if path.is_file() and ".ipynb_checkpoints" not in path.parts and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            copied.append(target)
    return copied


def lab_argv(extra: list[str], root: bool) -> list[str]:
    """The JupyterLab command line, with ``--allow-root`` where the user is root (containers, cloud VMs)."""
    allow_root = ["--allow-root"] if root and "--allow-root" not in extra else []
    return [sys.executable, "-m", "jupyterlab", *allow_root, *extra, FIRST]


def run(work: Path, extra: list[str], source: Path = NOTEBOOKS) -> NoReturn:
    """Refresh the working copies, then replace this process with JupyterLab in ``work``."""
    if not source.is_dir():
        raise MLXManagerError(f"no notebooks at {source}: `lab` runs from a clone of the repository")
    copied = copy_missing(source, work)
    print(f"JupyterLab on working copies in {work}/ ({len(copied)} copied now; the repository's "
          f"notebooks/ stay as committed: delete a copy to get it back)", flush=True)
    os.chdir(work)
    argv = lab_argv(extra, root=os.geteuid() == 0)
    os.execv(argv[0], argv)
