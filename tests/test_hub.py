"""Search, pull, ls, rm and du against a local stand-in of the Hugging Face hub (never the real one)."""

import os
import subprocess
import sys

import pytest
from hub_stand_in import HubStandIn
from huggingface_hub import constants
from IPython.utils.capture import capture_output

from mlx_manager_nb import hub, store
from mlx_manager_nb.errors import InvalidModelError, UnsupportedModelError
from mlx_manager_nb.model_pool import Pool

EXTRA = {"README.md": b"# tiny\n", "pytorch_model.bin": b"\0" * 5000}  # on the hub, not needed by mlx-lm


@pytest.fixture
def stand_in(monkeypatch, tmp_path, tiny_model_path):
    s = HubStandIn()
    s.add("mlx-community/tiny-4bit", tiny_model_path, EXTRA, downloads=50, likes=3, tags=["mlx", "4-bit"])
    s.add("mlx-community/tiny-chat", tiny_model_path, downloads=900, likes=12)
    s.add("someone/tiny-gguf", files={"tiny.Q4_0.gguf": b"GGUF", "README.md": b"hi"})
    s.add("meta/tiny-gated", tiny_model_path, gated=True)
    monkeypatch.setenv("HF_ENDPOINT", s.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # never the user's own
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # an empty cache per test
    yield s
    s.close()


def mlx(ip, line):
    with capture_output() as c:
        ip.run_line_magic("mlx", line)
    return c


def wanted_bytes(folder):
    return sum(p.stat().st_size for p in folder.iterdir() if not p.name.startswith("."))


def test_search_lists_the_hub_most_downloaded_first_with_what_fits(stand_in, tiny_model_path):
    rows = hub.search("tiny", author="mlx-community", max_memory=10**9)
    assert [r.repo for r in rows] == ["mlx-community/tiny-chat", "mlx-community/tiny-4bit"]
    four = rows[1]
    assert (four.downloads, four.likes, four.quantization, four.parameters) == (50, 3, "4-bit", 1_230_000_000)
    assert four.size_bytes == wanted_bytes(tiny_model_path)  # what a pull fetches: not README.md nor the .bin
    assert four.fits is True and four.last_modified.year == 2026
    assert hub.search("tiny", author="mlx-community", max_memory=1000)[0].fits is False
    assert hub.search("nothing-like-this", max_memory=1000) == []


def test_search_sizes_a_repo_listed_without_file_sizes_by_its_weights(stand_in, tiny_model_path):
    stand_in.add("org/unsized", tiny_model_path, listed_sizes=False)
    [row] = hub.search("unsized", max_memory=10**9)
    assert row.size_bytes == 2 * 1_230_000_000 and row.fits is False  # BF16 parameters, two bytes each


def test_search_magic_renders_a_table(shell, stand_in):
    c = mlx(shell, "search tiny --author mlx-community --limit 1")
    assert not c.stderr
    html = c.outputs[0].data["text/html"]
    assert "mlx-community/tiny-chat" in html and "tiny-4bit" not in html and "fits max_memory" in html
    assert "`%mlx pull mlx-community/tiny-chat`" in c.outputs[1].data["text/plain"]


def test_pull_fetches_only_mlx_files_with_byte_progress_then_loads(stand_in, tiny_model_path):
    seen = []
    path = hub.pull("mlx-community/tiny-4bit", seen.append)
    total = wanted_bytes(tiny_model_path)
    assert sorted(p.name for p in path.iterdir()) == sorted([".revision", *(p.name for p in tiny_model_path.iterdir())])
    assert stand_in.served == total  # README.md and pytorch_model.bin were not fetched
    done = [t.done for t in seen]
    assert done == sorted(done) and done[0] == 0 and done[-1] == total and len(set(done)) > 5
    assert all(t.total == total for t in seen) and seen[-1].eta == 0
    pool = Pool(max_models=1)
    try:
        info = pool.load("mlx-community/tiny-4bit")
        assert info.name == "mlx-community/tiny-4bit" and info.state == "ready"
        assert "mlx-community--tiny-4bit" in [m.name for m in store.list_local_models()]
    finally:
        pool.close()


def test_pool_load_of_a_repo_id_pulls_it_with_byte_fractions(stand_in):
    stages = []
    pool = Pool(max_models=1)
    try:
        info = pool.load("mlx-community/tiny-chat", progress=lambda stage, f: stages.append((stage, f)))
    finally:
        pool.close()
    fractions = [f for stage, f in stages if stage == "downloading"]
    assert info.path == hub.pulled_dir("mlx-community/tiny-chat") and stand_in.served > 0
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == 1 and len(set(fractions)) > 5


def test_an_interrupted_pull_keeps_its_part_and_the_next_fetches_only_the_rest(stand_in, tiny_model_path):
    def interrupt(t):
        if t.done > 200_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hub.pull("mlx-community/tiny-4bit", interrupt)
    kept = wanted_bytes(hub.partial_dir("mlx-community/tiny-4bit"))
    assert kept > 200_000 and not hub.pulled_dir("mlx-community/tiny-4bit").exists()
    stand_in.served = 0
    seen = []
    path = hub.pull("mlx-community/tiny-4bit", seen.append)
    total = wanted_bytes(tiny_model_path)
    assert stand_in.served == total - kept  # Range requests: no byte fetched twice
    assert seen[0].done == kept and [t.done for t in seen] == sorted(t.done for t in seen)
    assert (path / "model.safetensors").read_bytes() == (tiny_model_path / "model.safetensors").read_bytes()
    assert not hub.partial_dir("mlx-community/tiny-4bit").exists()


def test_pulls_at_once_fetch_once_and_an_up_to_date_repo_is_not_fetched_again(stand_in, tiny_model_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as ex:
        paths = list(ex.map(lambda _: hub.pull("mlx-community/tiny-chat"), range(3)))
    assert len(set(paths)) == 1 and stand_in.served == wanted_bytes(tiny_model_path)
    store.validate_model_dir(paths[0])
    hub.pull("mlx-community/tiny-chat")
    assert stand_in.served == wanted_bytes(tiny_model_path)


def test_a_cut_off_pull_of_a_repo_changed_since_starts_over(stand_in, tiny_model_path, tmp_path):
    from tiny_model import build_tiny_model

    def interrupt(t):
        if t.done > 200_000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        hub.pull("mlx-community/tiny-4bit", interrupt)
    other = build_tiny_model(tmp_path / "other", seed=1)
    stand_in.add("mlx-community/tiny-4bit", other, sha="second-commit")
    stand_in.served = 0
    path = hub.pull("mlx-community/tiny-4bit")
    assert stand_in.served == wanted_bytes(other)  # nothing kept from the first commit's parts
    assert (path / "model.safetensors").read_bytes() == (other / "model.safetensors").read_bytes()
    assert (path / ".revision").read_text() == "second-commit"


def test_an_interrupted_pull_magic_says_how_to_continue(shell, stand_in, monkeypatch):
    def interrupt(t):
        if t.done > 200_000:
            raise KeyboardInterrupt

    real = hub.pull
    monkeypatch.setattr(hub, "pull", lambda repo, progress: real(repo, lambda t: (progress(t), interrupt(t))))
    with pytest.raises(KeyboardInterrupt, match=r"partial files are kept.*`%mlx pull mlx-community/tiny-chat`"):
        mlx(shell, "pull mlx-community/tiny-chat")
    assert hub.partial_dir("mlx-community/tiny-chat").is_dir()


def test_pull_from_a_terminal_shows_a_byte_bar_and_names_the_error(stand_in, isolated_home, tmp_path):
    def run(repo):
        return subprocess.run([sys.executable, "-m", "mlx_manager_nb", "pull", repo], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                "HF_TOKEN_PATH": str(tmp_path / "no-token")})

    done = run("mlx-community/tiny-chat")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()  # text mode reads each \r as a line end
    assert lines[1].startswith("mlx-community/tiny-chat: 0 B of 382.2 KiB at") and lines[-2].endswith("100%")
    assert f"Pulled mlx-community/tiny-chat into {hub.pulled_dir('mlx-community/tiny-chat')}" in done.stdout
    refused = run("meta/tiny-gated")
    assert refused.returncode == 1 and refused.stderr.startswith("error: Cannot read 'meta/tiny-gated'")
    assert "set HF_TOKEN" in refused.stderr and "Traceback" not in refused.stderr


def test_a_failed_pull_leaves_nothing_behind(stand_in, tiny_model_path):
    broken = (tiny_model_path / "model.safetensors").read_bytes()[:-1000]
    stand_in.add("org/truncated", tiny_model_path, {"model.safetensors": broken})
    with pytest.raises(InvalidModelError, match="truncated"):
        hub.pull("org/truncated")
    assert not hub.partial_dir("org/truncated").exists() and not hub.pulled_dir("org/truncated").exists()
    with pytest.raises(InvalidModelError, match=r"not an MLX or mlx-lm-convertible model.*import-gguf"):
        hub.pull("someone/tiny-gguf")
    assert not hub.partial_dir("someone/tiny-gguf").exists()


def test_an_architecture_mlx_lm_cannot_load_is_refused_before_any_weight_is_fetched(stand_in, tiny_model_path):
    import json

    config = json.loads((tiny_model_path / "config.json").read_text())
    stand_in.add("org/alien", tiny_model_path, {"config.json": json.dumps({**config, "model_type": "alien"}).encode()})
    with pytest.raises(UnsupportedModelError, match=r"'org/alien' is a 'alien' model, which mlx-lm [\d.]+ cannot load"):
        hub.pull("org/alien")
    assert stand_in.served == len(stand_in.repos["org/alien"].files["config.json"])  # the config alone
    assert not hub.partial_dir("org/alien").exists() and not hub.pulled_dir("org/alien").exists()
    mistral = json.dumps({**config, "model_type": "mistral"}).encode()
    stand_in.add("org/remapped", tiny_model_path, {"config.json": mistral})
    store.validate_model_dir(hub.pull("org/remapped"))  # mlx-lm remaps mistral to llama


def test_a_connection_dropped_mid_file_keeps_the_part_and_the_next_pull_fetches_the_rest(stand_in, tiny_model_path):
    stand_in.drop = ("model.safetensors", 150_000)
    with pytest.raises(hub.HubError, match=r"partial files are kept: pull again.*connection to the hub .* failed"):
        hub.pull("mlx-community/tiny-4bit")
    part = hub.partial_dir("mlx-community/tiny-4bit")
    assert (part / "model.safetensors").stat().st_size == 150_000
    assert not hub.pulled_dir("mlx-community/tiny-4bit").exists()
    kept = wanted_bytes(part)
    stand_in.served = 0
    path = hub.pull("mlx-community/tiny-4bit")
    assert stand_in.served == wanted_bytes(tiny_model_path) - kept  # only the missing bytes, by a Range request
    assert (path / "model.safetensors").read_bytes() == (tiny_model_path / "model.safetensors").read_bytes()


def test_a_disk_full_mid_download_removes_the_partial_files_and_keeps_the_store(stand_in, isolated_home, tmp_path):
    import resource
    import signal

    kept = hub.pull("mlx-community/tiny-chat")

    def small_disk():  # a real limit: writing past 200 kB fails with EFBIG, as a full disk fails with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    run = subprocess.run([sys.executable, "-m", "mlx_manager_nb", "pull", "mlx-community/tiny-4bit"],
                         capture_output=True, text=True, timeout=120, preexec_fn=small_disk,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
                              "HF_TOKEN_PATH": str(tmp_path / "no-token")})
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("error: Cannot pull 'mlx-community/tiny-4bit': the disk is full (File too large); "
                                 "its partial files were removed, the store is as it was.")
    assert not hub.partial_dir("mlx-community/tiny-4bit").exists()
    assert not hub.pulled_dir("mlx-community/tiny-4bit").exists()
    assert [m.name for m in store.list_local_models()] == ["mlx-community--tiny-chat"]
    store.validate_model_dir(kept)


def test_gated_repos_ask_for_a_token_and_a_dead_hub_says_so(stand_in, monkeypatch):
    with pytest.raises(hub.HubError, match=r"answered 401.*set HF_TOKEN"):
        hub.pull("meta/tiny-gated")
    stand_in.token = "secret"
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert hub.pull("meta/tiny-gated").is_dir()
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(hub.HubError, match=r"the connection to the hub .* failed"):
        hub.pull("mlx-community/tiny-chat")
    with pytest.raises(hub.HubError, match=r"the connection to the hub .* failed"):
        hub.search("tiny", max_memory=1)


def test_a_pull_that_cannot_fit_on_the_disk_is_refused_before_it_starts(stand_in, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(hub.HubError, match=r"needs 0\.4 MiB.*has 0\.0 MiB free"):
        hub.pull("mlx-community/tiny-chat")
    assert not hub.partial_dir("mlx-community/tiny-chat").exists()


def test_pull_ls_du_and_rm_magics(shell, stand_in, tiny_model_path):
    c = mlx(shell, "pull mlx-community/tiny-chat")
    assert not c.stderr
    assert c.outputs[0].data["text/plain"].startswith("mlx-community/tiny-chat: 0 B of 382.2 KiB at")  # the bar
    assert "Pulled mlx-community/tiny-chat" in c.outputs[-1].data["text/plain"]
    listing = mlx(shell, "ls").outputs[0].data["text/plain"]
    assert "mlx-community--tiny-chat" in listing and str(hub.pulled_dir("mlx-community/tiny-chat")) in listing
    du = mlx(shell, "du").outputs[0].data["text/plain"]
    assert "store" in du and "total" in du
    assert not mlx(shell, "load mlx-community/tiny-chat").stderr
    refused = mlx(shell, "rm mlx-community--tiny-chat --yes")
    assert "is loaded" in refused.stderr and hub.pulled_dir("mlx-community/tiny-chat").is_dir()
    mlx(shell, "unload mlx-community/tiny-chat")
    asked = mlx(shell, "rm mlx-community--tiny-chat")
    assert "--yes" in asked.stdout and hub.pulled_dir("mlx-community/tiny-chat").is_dir()
    done = mlx(shell, "rm mlx-community--tiny-chat --yes")
    assert "Removed mlx-community--tiny-chat" in done.stdout and not hub.pulled_dir("mlx-community/tiny-chat").exists()


def test_convert_a_hub_repo_quantized_into_a_loadable_store_entry(shell, stand_in):
    c = mlx(shell, "convert mlx-community/tiny-chat --q-bits 4")
    assert not c.stderr, c.stderr
    last = c.outputs[-1].data["text/plain"]
    assert last.startswith("Converted mlx-community/tiny-chat into the store as tiny-chat-4bit (") and "4-bit" in last
    assert store.describe(store.models_dir() / "tiny-chat-4bit").quantization == "4-bit"
    assert not mlx(shell, "load tiny-chat-4bit").stderr
    assert "--q-bits: invalid choice: 3" in mlx(shell, "convert mlx-community/tiny-chat --q-bits 3").stderr


def test_the_pool_panels_find_section_searches_downloads_and_removes(stand_in, make_pool):
    from helpers import wait_for

    from mlx_manager_nb.widgets import pool_panel

    pool = make_pool(keep_alive=None)
    parts = pool_panel(pool).parts
    parts.query.value = "tiny"
    parts.search.click()
    assert wait_for(lambda: "mlx-community/tiny-4bit" in parts.results.value), parts.find_error.value
    assert parts.pick.value == "mlx-community/tiny-chat"  # the most downloaded first
    seen = []
    parts.bar.observe(lambda change: seen.append(change["new"]), "value")
    parts.download.click()
    assert wait_for(lambda: "Downloaded mlx-community/tiny-chat" in parts.find_error.value), parts.find_error.value
    assert seen == sorted(seen) and seen[-1] == 1.0 and " of 382.2 KiB at " in parts.bar_text.value
    assert parts.bar_row.layout.display is None and parts.bar.bar_style == "success"  # the full bar stays, green
    assert "mlx-community--tiny-chat" in parts.source.options
    pool.load("mlx-community/tiny-chat")
    parts.local.value = "mlx-community--tiny-chat"
    parts.remove.click()
    assert "is loaded" in parts.find_error.value and parts.confirm.layout.display == "none"
    pool.unload("mlx-community/tiny-chat")
    parts.remove.click()
    assert parts.confirm.layout.display is None and "Remove mlx-community--tiny-chat (" in parts.confirm.description
    assert hub.pulled_dir("mlx-community/tiny-chat").is_dir()  # nothing removed before the confirm
    parts.confirm.click()
    assert not hub.pulled_dir("mlx-community/tiny-chat").exists() and "Removed" in parts.find_error.value
    assert "mlx-community--tiny-chat" not in parts.source.options


def test_rm_of_a_hugging_face_cache_entry_and_of_a_linked_store_entry(shell, stand_in, tiny_model_path, tmp_path):
    import os
    import shutil as sh

    repo = tmp_path / "hf-cache" / "models--org--tiny"
    sh.copytree(tiny_model_path, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    store.models_dir().mkdir(parents=True)
    os.symlink(tiny_model_path, store.models_dir() / "linked")
    listing = mlx(shell, "ls").outputs[0].data["text/plain"]
    assert "org/tiny" in listing and "hf-cache" in listing and str(tiny_model_path) in listing
    assert "hf-cache" in mlx(shell, "du").outputs[0].data["text/plain"]
    done = mlx(shell, "rm org/tiny --yes")
    assert "Removed org/tiny" in done.stdout and not repo.exists()
    done = mlx(shell, "rm linked --yes")
    assert "only the link" in done.stdout and not (store.models_dir() / "linked").exists()
    assert (tiny_model_path / "model.safetensors").is_file()  # what the link pointed to stays
    assert "No local model named 'linked'" in mlx(shell, "rm linked").stderr
