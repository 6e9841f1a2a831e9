"""The suite keeps away from the user's data: pytest, notebooks included, runs in a home of its own."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from mlx_manager_nb.audit_log import AuditLog

REPO = Path(__file__).parents[1]
PROBE = Path(__file__).parent / "home_probe.ipynb"


def fingerprint(home: Path) -> dict[str, str]:
    """Every file and folder under `home`, with a checksum of each file's bytes."""
    return {str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(home.rglob("*"))}


def test_pytest_on_a_notebook_leaves_the_users_home_byte_for_byte_unchanged(tmp_path):
    user_home = tmp_path / "user-home"  # stands in for the user's MLX_NB_HOME: their audit log and a model
    theirs = AuditLog(user_home / "audit.db")
    theirs.record({"source": "api", "endpoint": "pool.chat", "model": "theirs", "status": "ok"})
    theirs.close()
    (user_home / "models" / "theirs").mkdir(parents=True)
    (user_home / "models" / "theirs" / "config.json").write_text('{"model_type": "llama"}')
    before = fingerprint(user_home)
    assert "audit.db" in before

    report = tmp_path / "probe-report.txt"
    env = {**os.environ, "MLX_NB_HOME": str(user_home), "MLX_NB_PROBE_REPORT": str(report)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(PROBE)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    audit_path, rows = report.read_text().split()
    assert rows == "1"  # the notebook's kernel wrote its row, and found only its own...
    assert not Path(audit_path).is_relative_to(user_home)  # ...in a home that is not the user's
    assert fingerprint(user_home) == before
