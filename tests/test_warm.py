"""Warm-ups on the tiny model: a progress bar for pool.warm and %mlx warm, serve(warm=...) and --warm."""

import json
import shutil
import time
import urllib.request

import pytest
from helpers import wait_for

from mlx_manager_nb.model_pool import ProgressEvent
from mlx_manager_nb.server import serve
from mlx_manager_nb.server_options import warm_prompts

DOC = [{"role": "system", "content": " ".join(f"Rule {i}: be kind." for i in range(60))}]  # ~960 tokens
QUESTION = [*DOC, {"role": "user", "content": "Which rule is first?"}]


@pytest.fixture
def model(wide_tiny_model_path, tmp_path):
    return shutil.copytree(wide_tiny_model_path, tmp_path / "tiny-copy")


def test_warm_reports_its_prefill_as_a_load_does(make_pool, model):
    pool = make_pool(keep_alive=None)
    pool.load(model, alias="tiny")
    told, events = [], []
    pool.subscribe(lambda e: events.append(e) if isinstance(e, ProgressEvent) else None)
    result = pool.warm("tiny", DOC, progress=lambda stage, fraction: told.append((stage, fraction)))
    fractions = [f for stage, f in told if stage == "warming"]
    assert told[0] == ("warming", 0.0) and told[-1] == ("ready", 1.0)
    assert any(0 < f < 1 for f in fractions) and fractions == sorted(fractions)  # prefilled in slices
    assert [(e.name, e.stage, e.fraction) for e in events] == [("tiny", s, f) for s, f in told]
    assert result.usage.prompt_tokens > 500


def test_percent_mlx_warm_shows_a_progress_bar_then_its_summary(shell, model, tmp_path):
    from IPython.utils.capture import capture_output

    from mlx_manager_nb import defaults

    defaults.default_pool().load(model, alias="tiny")
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC[0]["content"])
    with capture_output() as c:
        shell.run_line_magic("mlx", f"warm tiny --file {doc}")
    assert any("warming" in o.data["text/plain"] and "<progress" in o.data["text/html"] for o in c.outputs)
    assert c.stdout.startswith("Kept the KV cache of")


def test_serve_warms_its_prompts_after_it_starts_and_a_client_gets_them_cached(make_pool, model):
    pool = make_pool(keep_alive=None)
    pool.load(model, alias="tiny")
    started = time.perf_counter()
    server = serve(pool, port=0, mode="thread", warm=[("tiny", DOC), "never"])
    try:
        took = time.perf_counter() - started
        with urllib.request.urlopen(f"{server.url}/health", timeout=10) as r:
            assert r.status == 200
        assert wait_for(lambda: pool.models()[0].prompt_lookups >= 2, timeout=60)
        assert took < 1.0
        body = json.dumps({"model": "tiny", "messages": QUESTION, "max_tokens": 2, "temperature": 0}).encode()
        ask = urllib.request.Request(f"{server.url}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(ask, timeout=30) as r:
            usage = json.loads(r.read())["usage"]
        system = pool.count_tokens(DOC, "tiny") - 10  # less the assistant header the warm-up's template added
        assert usage["prompt_tokens_details"]["cached_tokens"] >= system
    finally:
        server.stop(drain=0)


def test_serve_warm_failures_are_one_warning_each(make_pool, model):
    pool = make_pool(keep_alive=None)
    pool.load(model, alias="tiny")
    with pytest.warns(RuntimeWarning, match="missing") as warned:
        server = serve(pool, port=0, mode="thread", warm=[("missing", "x"), ("tiny", "fine")])
        assert wait_for(lambda: pool.models()[0].prompt_lookups == 1, timeout=30)
        server.stop(drain=0)
    assert len([w for w in warned if "serve(warm=...)" in str(w.message)]) == 1


def test_the_warm_option_reads_files_as_system_prompts(tmp_path):
    doc = tmp_path / "a=b.txt"
    doc.write_text("Be brief.")
    system = [{"role": "system", "content": "Be brief."}]
    assert warm_prompts([str(doc), f"tiny={doc}"]) == [(None, system), ("tiny", system)]
    with pytest.raises(ValueError, match="--warm: cannot read"):
        warm_prompts([f"tiny={tmp_path / 'missing.txt'}"])


def test_the_command_line_loads_with_kv_bits_and_warms_its_files(tmp_path, isolated_home, ctrl_c_works):
    import os
    import signal
    import subprocess
    import sys

    from helpers import free_port
    from tiny_model import build_tiny_model

    model = build_tiny_model(tmp_path / "tiny-64", hidden_size=256, max_position_embeddings=4096)
    doc = tmp_path / "doc.txt"
    doc.write_text(DOC[0]["content"])
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_manager_nb", "serve", "--model", str(model), "--kv-bits", "8",
                             "--warm", f"tiny-64={doc}", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert wait_for(lambda: list((isolated_home / "kv").glob("*-kv8/*.safetensors")), timeout=90)
        body = json.dumps({"model": "tiny-64", "messages": [*DOC, {"role": "user", "content": "First rule?"}],
                           "max_tokens": 2}).encode()
        ask = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(ask, timeout=30) as r:
            assert json.loads(r.read())["usage"]["prompt_tokens_details"]["cached_tokens"] > 900
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
