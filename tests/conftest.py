import mlx_manager_nb  # noqa: F401, I001  (first, so MLX binds the fast BLAS as it does for users)
import pytest

# run only by test_user_home.py, in a pytest of its own: it checks that pytest keeps the user's home untouched
collect_ignore = ["home_probe.ipynb"]


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny random-weight llama model folder (mlx-lm layout) with a trained tokenizer."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def wide_tiny_model_path(tiny_model_path, tmp_path_factory):
    """The tiny model with a 4096-token context: its tokenizer spends about a token per character
    of a tool listing, more than its 512 tokens hold."""
    import json
    import shutil

    path = tmp_path_factory.mktemp("wide") / "tiny-llama"
    shutil.copytree(tiny_model_path, path)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        config = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps({**config, key: 4096}))
    return path


@pytest.fixture
def ctrl_c_works():
    """Children start with Ctrl-C's default action, as in a terminal, even where this run ignores SIGINT
    (a background job, `nohup`): an ignored signal stays ignored across exec, a handled one does not."""
    import signal

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own store directory (the session's home is only for the demo model)."""
    home = tmp_path / "mlx-home"
    monkeypatch.setenv("MLX_NB_HOME", str(home))
    return home


@pytest.fixture
def audit(tmp_path):
    """An audit log in a real SQLite file, closed after the test."""
    from mlx_manager_nb.audit_log import AuditLog

    log = AuditLog(tmp_path / "audit.db")
    yield log
    log.close()


def _module_pool(path):
    """A pool holding the model at ``path`` as ``tiny``, closed when the module's tests are done."""
    from mlx_manager_nb.model_pool import Pool

    p = Pool(keep_alive=None)
    p.load(path, alias="tiny")
    yield p
    p.close()


@pytest.fixture(scope="module")
def tiny_module_pool(tiny_model_path):
    """A pool holding the tiny model as ``tiny``, shared by one module's tests."""
    yield from _module_pool(tiny_model_path)


@pytest.fixture(scope="module")
def wide_pool(wide_tiny_model_path):
    """A pool holding the wide tiny model as ``tiny``, shared by one module's tests (tool listings fit)."""
    yield from _module_pool(wide_tiny_model_path)


@pytest.fixture(scope="module")
def wide_server(wide_pool):
    """A thread-mode server over ``wide_pool``, shared by one module's tests."""
    from mlx_manager_nb.server import serve

    s = serve(wide_pool, port=0, mode="thread")
    yield s
    s.stop(drain=0)


@pytest.fixture
def shell():
    """A fresh IPython shell (history in memory) with the extension loaded, over fresh default pool and
    audit log; servers still running and the defaults are cleared afterwards.

    The shell is made the global instance for the test, as in a kernel: display() and
    capture_output() publish through InteractiveShell.instance().
    """
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output
    from traitlets.config import Config

    from mlx_manager_nb import defaults
    from mlx_manager_nb.server import running_servers

    defaults.reset_defaults()
    InteractiveShell.clear_instance()
    config = Config()
    config.HistoryManager.hist_file = ":memory:"
    ip = InteractiveShell.instance(config=config)
    with capture_output() as c:
        ip.run_line_magic("load_ext", "mlx_manager_nb")
    ip.banner_output = c.stdout
    yield ip
    for server in running_servers():
        server.stop(drain=0)
    defaults.reset_defaults()
    InteractiveShell.clear_instance()


@pytest.fixture
def make_pool():
    """Make pools with `make_pool(**kwargs)`; each is closed and its engine thread ended after the test."""
    from mlx_manager_nb.model_pool import Pool

    made = []

    def make(**kwargs):
        pool = Pool(**kwargs)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        try:
            pool.close()
        finally:
            pool.engine.stop()


@pytest.fixture
def pool(make_pool, tiny_model_path, audit):
    """A pool recording into ``audit``, with the tiny model loaded as ``tiny``."""
    p = make_pool(keep_alive=None, audit=audit)
    p.load(tiny_model_path, alias="tiny")
    return p


@pytest.fixture
def server(pool):
    """A thread-mode server on a free port over ``pool``."""
    from mlx_manager_nb.server import serve

    s = serve(pool, port=0, mode="thread")
    yield s
    s.stop(drain=0)
