import mlx_manager_nb  # noqa: F401, I001  (first, so MLX binds the fast BLAS as it does for users)
import pytest


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


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own store directory."""
    home = tmp_path / "mlx-home"
    monkeypatch.setenv("MLX_NB_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def demo_home(tmp_path_factory):
    """A store home holding the real demo model, fetched and imported once per session."""
    import os

    from mlx_manager_nb.demo import ensure_demo

    home = tmp_path_factory.mktemp("demo-home")
    old = os.environ.get("MLX_NB_HOME")
    os.environ["MLX_NB_HOME"] = str(home)
    try:
        ensure_demo()
    finally:
        if old is None:
            del os.environ["MLX_NB_HOME"]
        else:
            os.environ["MLX_NB_HOME"] = old
    return home


@pytest.fixture
def audit(tmp_path):
    """An audit log in a real SQLite file, closed after the test."""
    from mlx_manager_nb.audit_log import AuditLog

    log = AuditLog(tmp_path / "audit.db")
    yield log
    log.close()
