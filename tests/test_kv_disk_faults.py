"""The prompt cache's disk tier when its disk fails for real: full (a file-size limit: EFBIG, as ENOSPC or
EDQUOT would be), and a home the user cannot write. Each runs a pool in a subprocess set up that way."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SCRIPT = r"""
import json, os, resource, signal, sys, warnings
case, model = sys.argv[1], sys.argv[2]
if case == "full":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
import mlx_manager_nb
from mlx_manager_nb.model_pool import Pool

long = " ".join(f"item {i} is blue." for i in range(80))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pool = Pool(keep_alive=None)
    pool.load(model, alias="tiny")
    if case == "nobody":  # from here on (all threads): the Python and the model, under /root, are loaded
        os.setgid(65534)
        os.setuid(65534)
    answers = [pool.chat([{"role": "user", "content": text}], temperature=0, max_tokens=8)
               for text in (long, long[::-1], long)]
    pool.close()
print(json.dumps({"finish": [a.finish_reason for a in answers], "cached": [a.usage.cached_tokens for a in answers],
                  "warnings": [str(w.message) for w in caught if "prompt cache" in str(w.message)]}))
"""


def run(case, model, home):
    env = {**os.environ, "MLX_NB_HOME": str(home), "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, "-c", SCRIPT, case, str(model)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_a_full_disk_stops_the_writes_with_one_warning_and_leaves_no_partial_file(wide_tiny_model_path,
                                                                                   isolated_home):
    seen = run("full", wide_tiny_model_path, isolated_home)
    assert all(seen["finish"]) and seen["cached"][2] > 0  # served on, the memory tier still at work
    (warning,) = seen["warnings"]
    assert "stops writing" in warning and "File too large" in warning
    assert [p for p in (isolated_home / "kv").rglob("*") if p.is_file()] == []


@pytest.mark.skipif(not hasattr(os, "setuid"), reason="no POSIX users here")
def test_a_home_the_user_cannot_write_keeps_the_prompt_cache_in_memory(wide_tiny_model_path):
    """Root writes anywhere, whatever the modes: as root, the pool loads its model, then runs as nobody over a
    root-owned home (elsewhere, as the user over a home without write permission)."""
    place = Path(tempfile.mkdtemp())  # where nobody may look, unlike pytest's own folders
    try:
        home = place / "home"
        home.mkdir()
        place.chmod(0o755)
        home.chmod(0o755 if os.geteuid() == 0 else 0o555)
        seen = run("nobody" if os.geteuid() == 0 else "user", wide_tiny_model_path, home)
        assert all(seen["finish"]) and seen["cached"][2] > 0
        (warning,) = seen["warnings"]
        assert "stops writing" in warning and "Permission denied" in warning
        assert list(home.iterdir()) == []
    finally:
        shutil.rmtree(place)
