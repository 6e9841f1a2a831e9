"""The notebooks as saved: what someone sees on opening one before running it (GitHub, JupyterLab, Binder)."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_saved_notebook_holds_no_stale_widgets_and_is_small(path):
    """Saved widget views show as raw reprs (``Tab(children=(VBox(...``) until the notebook runs again.

    Clear them before saving: strip ``metadata.widgets`` and the widget outputs (JupyterLab: Edit >
    Clear Outputs of the cell, with Settings > Save Widget State Automatically off).
    """
    nb = json.loads(path.read_text())
    assert "widgets" not in nb["metadata"], "saved widget state"
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert not [c["id"] for c in cells if any(WIDGET_VIEW in o.get("data", {}) for o in c["outputs"])]
    assert not [c["id"] for c in cells if "execution" in c["metadata"]], "per-cell timings: noise in diffs"
    assert path.stat().st_size < 40_000


def test_the_dashboard_notebook_shows_a_picture_of_the_dashboard_before_it_runs():
    nb = json.loads((NOTEBOOKS[0].parent / "02_dashboard.ipynb").read_text())
    text = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "](images/dashboard.png)" in text  # beside the notebook: served wherever the notebooks are
    assert (NOTEBOOKS[0].parent / "images" / "dashboard.png").is_file()


def test_the_dashboard_notebook_leaves_the_audit_filters_at_all():
    nb = json.loads((NOTEBOOKS[0].parent / "02_dashboard.ipynb").read_text())
    filters = [line for c in nb["cells"] for line in "".join(c["source"]).splitlines() if ".source.value =" in line]
    assert filters[-1].endswith('= "(all)"')
