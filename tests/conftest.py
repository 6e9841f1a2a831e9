import pytest

from tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny random-weight llama model folder (mlx-lm layout) with a trained tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own store directory."""
    home = tmp_path / "mlx-home"
    monkeypatch.setenv("MLX_NB_HOME", str(home))
    return home
