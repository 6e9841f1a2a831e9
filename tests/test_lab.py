"""``make lab``: JupyterLab on working copies of the notebooks, as root too, leaving notebooks/ as committed."""

import json
import os
import urllib.request

import pytest
from helpers import ROOT, make_lab

from mlx_manager_nb.lab import copy_missing, lab_argv

TOKEN = "lab-test-token"


def committed_notebooks() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((ROOT / "notebooks").glob("*.ipynb"))}


def get(url: str, method: str = "GET", body: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return r.status, r.read()


def test_make_lab_serves_working_copies_with_the_dashboard_picture_and_leaves_the_repository_alone(tmp_path):
    pytest.importorskip("jupyterlab", reason="JupyterLab is in the demo extra")
    before = committed_notebooks()
    work = tmp_path / "lab"
    with make_lab(work, tmp_path / "jupyter", TOKEN) as url:  # as root, make lab adds --allow-root itself
        status, picture = get(f"{url}/files/images/dashboard.png")  # the path 02_dashboard's Markdown uses
        assert status == 200 and picture.startswith(b"\x89PNG")
        _, body = get(f"{url}/api/contents/02_dashboard.ipynb")
        saved = json.loads(body)
        assert saved["path"] == "02_dashboard.ipynb"
        saved["content"]["cells"][0]["source"] = "edited in the lab"  # what a run and an autosave do
        get(f"{url}/api/contents/02_dashboard.ipynb", "PUT", {"type": "notebook", "format": "json",
                                                               "content": saved["content"]})
    assert "edited in the lab" in (work / "02_dashboard.ipynb").read_text()
    assert committed_notebooks() == before
    assert sorted(p.name for p in work.glob("*.ipynb")) == sorted(before)


def test_working_copies_keep_the_users_edits_and_get_back_what_was_deleted(tmp_path):
    source, work = tmp_path / "notebooks", tmp_path / "lab"
    (source / "images").mkdir(parents=True)
    (source / "a.ipynb").write_text("committed a")
    (source / "b.ipynb").write_text("committed b")
    (source / "images" / "p.png").write_bytes(b"png")
    assert len(copy_missing(source, work)) == 3
    (work / "a.ipynb").write_text("edited a")
    (work / "b.ipynb").unlink()
    assert copy_missing(source, work) == [work / "b.ipynb"]
    assert (work / "a.ipynb").read_text() == "edited a" and (work / "b.ipynb").read_text() == "committed b"


def test_root_gets_allow_root_and_other_users_do_not():
    assert "--allow-root" in lab_argv(["--port", "8890"], root=True)
    assert "--allow-root" not in lab_argv(["--port", "8890"], root=False)
    assert lab_argv(["--allow-root"], root=True).count("--allow-root") == 1
    assert lab_argv([], root=os.geteuid() == 0)[-1] == "01_quickstart.ipynb"
