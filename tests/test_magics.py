"""The %mlx and %%chat magics in an in-process IPython shell, on the tiny model."""

import json
import queue
import re
import shutil
import subprocess
import sys
import urllib.request

import pytest
from helpers import call, raw_http, slow_upload, wait_for
from IPython.utils.capture import capture_output

import mlx_manager_nb
from mlx_manager_nb import defaults, display, magics
from mlx_manager_nb.audit_log import AuditLog
from mlx_manager_nb.engine import Delta, Done, Request
from mlx_manager_nb.params import GenParams
from mlx_manager_nb.server import running_servers
from mlx_manager_nb.streams import TextStream

COMMANDS = ["load", "unload", "pin", "unpin", "ls", "search", "pull", "rm", "du", "ps", "default", "import-gguf",
            "convert", "serve", "stop", "status", "audit", "dashboard", "doctor", "warm"]


@pytest.fixture
def ip(shell):
    return shell


@pytest.fixture
def tiny(ip, tiny_model_path):
    c = mlx(ip, f"load {tiny_model_path} --as tiny")
    assert not c.stderr
    return mlx_manager_nb.pool


def mlx(ip, line):
    with capture_output() as c:
        ip.run_line_magic("mlx", line)
    return c


def chat(ip, line, cell, **kwargs):
    with capture_output(**kwargs) as c:
        ip.run_cell_magic("chat", line, cell)
    return c


def conversations(ip):
    return ip.magics_manager.registry["MLXMagics"].conversations


def one_line_error(c):
    assert not c.stdout and not c.outputs
    assert c.stderr.count("\n") == 1 and "Traceback" not in c.stderr
    return c.stderr


def texts(c, mime="text/plain"):
    return [o.data[mime] for o in c.outputs if mime in o.data]


def fake_stream(text):
    """A finished TextStream that yields `text` in two deltas."""
    events = queue.Queue()
    for part in (text[: len(text) // 2], text[len(text) // 2:]):
        events.put(Delta(part))
    events.put(Done("stop", None, 3, 2, 0, 0.01, 0.02))
    return TextStream("req_fake", "fake", Request("fake", [], GenParams(), lambda e: None), events)


# -- %load_ext, parsing and help ----------------------------------------------------------------


def test_load_ext_prints_one_banner_line_and_the_package_import_needs_no_ipython(ip):
    assert ip.banner_output.count("\n") == 1
    assert mlx_manager_nb.__version__ in ip.banner_output and "CPU" in ip.banner_output
    assert "0 models loaded" in ip.banner_output and "%mlx load demo" in ip.banner_output
    code = "import sys, mlx_manager_nb; assert 'IPython' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_command_has_help_and_bare_mlx_lists_them(ip):
    for name in COMMANDS:
        c = mlx(ip, f"{name} --help")
        assert c.stdout.startswith(f"usage: %mlx {name}") and not c.stderr
    listing = mlx(ip, "").stdout
    assert all(name in listing for name in COMMANDS) and listing == mlx(ip, "--help").stdout
    c = chat(ip, "--help", "ignored")
    assert c.stdout.startswith("usage: %%chat") and "--max-tokens" in c.stdout and not c.outputs


@pytest.mark.parametrize(("line", "message"), [
    ("frobnicate", "invalid choice: 'frobnicate'"),
    ("load", "the following arguments are required: MODEL"),
    ("load x --keep-alive -3", "invalid keep_alive value"),
    ("audit --last many", "invalid int value"),
    ("ps --bogus", "unrecognized arguments: --bogus"),
    ("load 'unclosed", "No closing quotation"),
])
def test_a_bad_command_line_is_one_line_with_usage_hint(ip, line, message):
    err = one_line_error(mlx(ip, line))
    assert message in err and "--help" in err


def test_parse_never_exits():
    with pytest.raises(magics.UsageError):
        magics.parse(magics.chat_parser(), "--format yaml")
    assert magics.parse(magics.chat_parser(), "--help") is None
    a = magics.parse(magics.chat_parser(), 'tiny -t 0.5 --system "Be brief" --new')
    assert (a.model, a.temperature, a.system, a.new, a.name) == ("tiny", 0.5, "Be brief", True, "default")


# -- models -------------------------------------------------------------------------------------


def test_load_shows_progress_then_one_line_and_ps_pin_default_unload(ip, tiny_model_path):
    c = mlx(ip, f"load {tiny_model_path} --as tiny --keep-alive 60")
    assert "<progress" in c.outputs[0].data["text/html"] and "%" in c.outputs[0].data["text/plain"]
    assert texts(c)[-1].startswith("Loaded tiny-llama as 'tiny'") and not c.stderr

    ps = mlx(ip, "ps").outputs[0].data
    assert "<td>tiny-llama</td><td>tiny</td><td>chat</td><td>ready</td>" in ps["text/html"]
    row = ps["text/plain"].splitlines()[2].split()
    assert row[:4] == ["tiny-llama", "tiny", "chat", "ready"] and row[-3:] == ["no", "60", "s"]
    assert row[-4] == "user"  # loaded by the user, not by a client's request
    assert "(default)" not in ps["text/plain"]  # no default set: the most recent model serves, none is marked

    assert "Pinned tiny" in mlx(ip, "pin tiny").stdout
    assert mlx_manager_nb.pool.models()[0].pinned
    assert "Unpinned tiny" in mlx(ip, "unpin tiny").stdout
    assert "uses tiny when" in mlx(ip, "default tiny").stdout and mlx_manager_nb.pool.default == "tiny"
    assert "tiny-llama (default)" in mlx(ip, "ps").outputs[0].data["text/plain"]
    assert "Unloaded tiny" in mlx(ip, "unload tiny").stdout
    assert "No model is loaded" in mlx(ip, "ps").stdout


def test_errors_are_one_line_and_the_pool_goes_on(ip, tiny_model_path):
    assert "%mlx ls" in one_line_error(mlx(ip, "load no-such-model"))
    assert "No such model file or folder" in one_line_error(mlx(ip, "load /no/such/folder"))
    assert "not in the pool" in one_line_error(mlx(ip, "unload ghost"))
    assert "%mlx load demo" in one_line_error(mlx(ip, "default ghost"))
    err = one_line_error(chat(ip, "", "Hello"))
    assert err.startswith("ModelNotFoundError: No model is loaded") and "%mlx load demo" in err
    assert not mlx(ip, f"load {tiny_model_path}").stderr
    err = one_line_error(chat(ip, "-t -1", "Hello"))
    assert err == "InvalidParameterError: temperature must be >= 0, got -1.0\n"
    assert "Hello" not in json.dumps(conversations(ip))
    assert chat(ip, "--max-tokens 3", "Hello").outputs  # the pool still works


def test_ls_and_import_gguf(ip, tiny_model_path, isolated_home, tmp_path, monkeypatch):
    from gguf_writer import write_tiny_gguf
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))

    assert "No local models" in mlx(ip, "ls").stdout
    shutil.copytree(tiny_model_path, isolated_home / "models" / "copy")
    gguf = tmp_path / "Tiny.Q8_0.gguf"
    write_tiny_gguf(tiny_model_path, gguf, weight_type="Q8_0")
    c = mlx(ip, f"import-gguf {gguf} --as tinyq")
    assert texts(c)[-1].startswith(f"Imported {gguf} into the store as tinyq") and not c.stderr
    table = mlx(ip, "ls").outputs[0].data["text/plain"].splitlines()
    assert table[0].split() == ["name", "architecture", "on", "disk", "quantization", "context", "chat", "template",
                                "origin", "where"]
    assert table[2].split()[:2] == ["copy", "llama"] and "float" in table[2] and "512" in table[2]
    assert table[2].split()[-2:] == ["store", str((isolated_home / "models" / "copy").resolve())]
    assert table[3].split()[:2] == ["tinyq", "llama"] and "8-bit" in table[3]
    loaded = texts(mlx(ip, "load tinyq"))[-1]  # on a CPU, quantized weights load as float32: both sizes shown
    assert re.match(r"Loaded tinyq \([\d.]+ [KM]iB as float32 on CPU, [\d.]+ [KM]iB on disk as 8-bit, context", loaded)
    mlx(ip, "unload tinyq")
    assert "does not exist" in one_line_error(mlx(ip, f"import-gguf {tmp_path / 'none.gguf'}"))


# -- %%chat -------------------------------------------------------------------------------------


def test_chat_streams_markdown_then_a_footer_and_stores_out(ip, tiny):
    ip.user_ns["x"] = "you"
    c = chat(ip, "-t 0 --max-tokens 5 --out answer", "Hi {x}")
    answer = ip.user_ns["answer"]
    assert answer == tiny.chat([{"role": "user", "content": "Hi you"}], temperature=0, max_tokens=5).text
    markdown = [o for o in c.outputs if "text/markdown" in o.data]
    assert markdown[0].data["text/markdown"] == "…" and markdown[0].transient["display_id"]
    assert markdown[-1].update and markdown[-1].data["text/markdown"] == answer
    foot = c.outputs[-1].data["text/plain"]
    assert foot.startswith("tiny · 5 tokens · first token ") and "tokens/s" in foot and "max-tokens" in foot
    assert not c.stderr and not c.stdout


def test_chat_in_a_terminal_prints_the_deltas(ip, tiny):
    c = chat(ip, "-t 0 --max-tokens 5", "Hi", display=False)
    answer = conversations(ip)["default"][-1]["content"]
    assert c.stdout.startswith(answer + "\n") and "tiny · 5 tokens" in c.stdout


def test_interpolation_fills_names_and_keeps_double_braces(ip, tiny):
    ip.user_ns.update(city="Paris", d={"k": 3})
    chat(ip, "--max-tokens 2", "{city} {d[k]} {{city}} {{}} {city!r:>9}")
    assert conversations(ip)["default"][0]["content"] == "Paris 3 {city} {}   'Paris'"
    assert "{nowhere} is not defined" in one_line_error(chat(ip, "", "Hi {nowhere}"))
    assert "{} needs a variable name" in one_line_error(chat(ip, "", "Hi {}"))
    assert "literal braces" in one_line_error(chat(ip, "", "a } b"))
    assert "the cell is empty" in one_line_error(chat(ip, "", "  \n"))
    assert "--out needs a variable name" in one_line_error(chat(ip, "--out 1x", "Hi"))


def test_conversations_continue_per_name_and_new_starts_over(ip, tiny):
    chat(ip, "--max-tokens 2", "one")
    chat(ip, "--max-tokens 2", "two")
    chat(ip, "--name side --system 'Be brief' --max-tokens 2", "aside")
    conv = conversations(ip)
    assert [m["role"] for m in conv["default"]] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in conv["default"][::2]] == ["one", "two"]
    assert conv["side"][:2] == [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "aside"}]
    chat(ip, "--name side --max-tokens 2", "again")
    assert conv["side"][0]["content"] == "Be brief" and len(conv["side"]) == 5
    chat(ip, "--new --max-tokens 2", "three")
    assert next(m["content"] for m in conv["default"]) == "three" and len(conv["default"]) == 2
    conv["full"] = [{"role": "user", "content": "why " * 600}, {"role": "assistant", "content": "because"}]
    assert "`%%chat --new` starts the conversation over" in one_line_error(chat(ip, "--name full", "and?"))


def test_format_code_puts_the_first_fenced_block_in_a_new_cell(ip, tiny, monkeypatch):
    inputs = []
    monkeypatch.setattr(ip, "set_next_input", lambda text, replace=False: inputs.append((text, replace)))
    c = chat(ip, "-t 0 --max-tokens 5 --format code --out code", "Write code")
    assert inputs == [(conversations(ip)["default"][-1]["content"].strip(), False)]  # no fence: all of it
    monkeypatch.setattr(tiny, "chat", lambda *a, **k: fake_stream("Sure:\n```python\nx = 1\nprint(x)\n```\nDone."))
    chat(ip, "--format code --out code", "Write code")
    assert inputs[-1] == ("x = 1\nprint(x)", False) and ip.user_ns["code"] == "x = 1\nprint(x)"
    assert "text/markdown" in c.outputs[0].data


def test_format_json_parses_the_first_object_or_array(ip, tiny, monkeypatch):
    assert "no JSON object or array" in chat(ip, "-t 0 --max-tokens 5 --format json", "JSON please").stderr
    monkeypatch.setattr(tiny, "chat", lambda *a, **k: fake_stream('Here {oops} [1, {"a": "<b>"}] and {"c": 2}'))
    c = chat(ip, "--format json --out data", "JSON please")
    assert ip.user_ns["data"] == [1, {"a": "<b>"}]
    assert c.outputs[-1].data["application/json"] == [1, {"a": "<b>"}] and not c.stderr
    assert "fake · 2 tokens" in c.outputs[-2].data["text/plain"]


def test_format_text_streams_plain_text(ip, tiny):
    c = chat(ip, "-t 0 --format text --max-tokens 5", "Hi")
    answer = conversations(ip)["default"][-1]["content"]
    shown = [o for o in c.outputs if set(o.data) == {"text/plain"}]  # the answer, without a markdown version
    assert answer and len(shown) >= 2  # the placeholder, then the answer updated in place
    assert shown[0].data["text/plain"] == "…" and shown[0].transient["display_id"]
    assert shown[-1].update and shown[-1].data["text/plain"] == answer
    assert c.outputs[-1].data["text/plain"].startswith("tiny · 5 tokens")  # the footer follows
    assert all("text/markdown" not in o.data for o in c.outputs) and not c.stderr


def test_interrupt_keeps_the_partial_answer_and_frees_the_slot(ip, tiny, monkeypatch):
    update, calls = display.Live.update, []

    def interrupted_update(self, bundle, final=False):
        calls.append(bundle)
        if len(calls) == 4:
            raise KeyboardInterrupt
        update(self, bundle, final)

    monkeypatch.setattr(display.Live, "update", interrupted_update)
    with capture_output() as c, pytest.raises(KeyboardInterrupt) as info:
        ip.run_cell_magic("chat", "-t 0 --max-tokens 400", "Tell me a long story")
    assert info.value._render_traceback_() == [
        "KeyboardInterrupt: generation stopped; the partial answer is kept in conversation 'default'"]
    partial = conversations(ip)["default"][-1]["content"]
    assert partial and texts(c, "text/markdown")[-1] == partial
    assert wait_for(lambda: tiny.models()[0].in_flight == 0)
    assert wait_for(lambda: mlx_manager_nb.audit.query(source="magic"))
    row = mlx_manager_nb.audit.query(source="magic")[0]
    assert row["status"] == "cancelled" and row["completion_tokens"] < 400


# -- audit, server, dashboard -------------------------------------------------------------------


def test_requests_are_audited_as_magic(ip, tiny):
    chat(ip, "-t 0 --max-tokens 3", "Hi")
    chat(ip, "ghost", "Hi")
    rows = mlx_manager_nb.audit.query(source="magic")
    assert [(r["status"], r["endpoint"], r["protocol"], r["stream"]) for r in rows] == [
        ("error", "%%chat", "python", True), ("ok", "%%chat", "python", True)]
    table = mlx(ip, "audit").outputs[0].data["text/plain"].splitlines()
    assert len(table) == 4 and "magic" in table[2] and "ModelNotFoundError" in table[2] and "ok" in table[3]
    errors = mlx(ip, "audit --errors --last 5").outputs[0].data["text/plain"].splitlines()
    assert len(errors) == 3 and "error" in errors[2]
    assert len(mlx(ip, "audit --last 1").outputs[0].data["text/plain"].splitlines()) == 3
    assert "No requests recorded" in mlx(ip, "audit --model other").stdout
    stats = mlx(ip, "audit stats").outputs[0].data["text/plain"].splitlines()
    assert stats[2].split()[:3] == ["ghost", "1", "1"] and stats[3].split()[:4] == ["tiny-llama", "1", "0", "0%"]


def test_an_audit_database_problem_is_one_line(ip, tmp_path):
    with pytest.warns(RuntimeWarning):
        defaults._audit = AuditLog(tmp_path)  # a folder: sqlite cannot open it
    assert "cannot be read" in one_line_error(mlx(ip, "audit"))
    assert "cannot be read" in one_line_error(mlx(ip, "audit stats"))
    assert "problem:" in mlx(ip, "status").outputs[0].data["text/plain"]


def test_serve_status_stop(ip, tiny):
    c = mlx(ip, "serve --thread --port 0")
    (server,) = running_servers()
    assert c.stdout.startswith(f"Serving at {server.url}") and server.running
    assert json.load(urllib.request.urlopen(server.url + "/health", timeout=5))
    status = mlx(ip, "status").outputs[0].data["text/plain"]
    assert f"{server.url} (thread mode)" in status and "requests" in status and "tiny" in status
    assert "already running" in one_line_error(mlx(ip, "serve --thread --port 0"))
    assert mlx(ip, "stop").stdout == f"The server at {server.url} stopped.\n" and not server.running
    assert "No server is running" in one_line_error(mlx(ip, "stop"))
    assert "not running" in mlx(ip, "status").outputs[0].data["text/plain"]
    assert "Refusing to serve" in one_line_error(mlx(ip, "serve --thread --host 0.0.0.0 --port 0"))


def test_serve_takes_the_command_lines_security_and_storage_switches(ip, tiny):
    mlx(ip, "serve --thread --port 0 --allowed-host notebook.example --no-store-responses")
    (server,) = running_servers()
    port = int(server.url.rsplit(":", 1)[1])
    assert raw_http(port, b"GET /health HTTP/1.1\r\nhost: notebook.example\r\n")[0] == 200
    assert raw_http(port, b"GET /health HTTP/1.1\r\nhost: elsewhere.example\r\n")[0] == 403
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 3}
    status, _, answer = call(server.url + "/v1/responses", body)
    assert status == 200 and call(server.url + f"/v1/responses/{answer['id']}", method="GET")[0] == 404  # not kept
    image = {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}}]}]}
    status, _, answer = call(server.url + "/v1/chat/completions", image)
    assert status == 400 and "does not download images" in answer["error"]["message"]  # off by default
    mlx(ip, "stop")
    mlx(ip, "serve --thread --port 0 --allow-image-urls")
    (server,) = running_servers()
    status, _, answer = call(server.url + "/v1/chat/completions", image)  # nothing listens on port 9
    assert status == 400 and "download failed" in answer["error"]["message"]
    mlx(ip, "stop")


def test_serve_takes_the_request_limit_switches(ip, tiny):
    assert "max_model_queue must be" in one_line_error(mlx(ip, "serve --thread --port 0 --max-model-queue 0"))
    mlx(ip, "serve --thread --port 0 --max-client-requests 1 --max-model-queue 8")
    (server,) = running_servers()
    with slow_upload(server.port) as held:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert wait_for(lambda: call(server.url + "/v1/chat/completions", body)[0] == 429)
    assert held == [200] and call(server.url + "/v1/chat/completions", body)[0] == 200
    mlx(ip, "stop")


def test_dashboard_shows_the_widgets_or_one_line(ip, monkeypatch):
    assert "application/vnd.jupyter.widget-view+json" in mlx(ip, "dashboard").outputs[0].data
    monkeypatch.setitem(sys.modules, "mlx_manager_nb.widgets", None)
    assert "The dashboard is not available" in one_line_error(mlx(ip, "dashboard"))


def test_doctor_shows_the_blas_and_its_measured_speed(ip):
    from mlx_manager_nb import blas

    text = mlx(ip, "doctor").outputs[0].data["text/plain"]
    assert blas.status in text and "GFLOPS" in text and "max memory" in text
    assert re.search(r"keep alive +(\d+ (ms|s|min)|[\d.]+ h|forever) idle, then a model unloads", text), text


# -- helpers ------------------------------------------------------------------------------------


def test_extract_code_and_json():
    assert magics.extract_code("a\n```py\n  x = 1\n```\n```\ny\n```") == "  x = 1"
    assert magics.extract_code("```\ncut off") == "cut off"
    assert magics.extract_code("  plain  \n") == "plain"
    assert magics.extract_json('{"a": {"b": [1]}} [2]') == {"a": {"b": [1]}}
    with pytest.raises(ValueError):
        magics.extract_json("{not json}")


def test_tables_escape_html_and_align_text():
    bundle = display.table([["<b>", None], ["long value", 1]], ["name", "x"])
    assert "<td>&lt;b&gt;</td><td>–</td>" in bundle["text/html"]
    assert bundle["text/plain"].splitlines() == ["name        x", "----------  -", "<b>         –", "long value  1"]


def test_chat_with_a_schema_shows_and_stores_the_parsed_object(ip, tiny):
    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=8)
        kind: str = Field(pattern="^(cat|dog)$")

    ip.user_ns["Pet"] = Pet
    c = chat(ip, "-t 1 --max-tokens 100 --schema Pet --out pet", "A pet?")
    assert isinstance(ip.user_ns["pet"], Pet)
    shown = [o.data["application/json"] for o in c.outputs if "application/json" in o.data]
    assert shown == [ip.user_ns["pet"].model_dump()]
    assert "--schema Pat: no such variable" in one_line_error(chat(ip, "--schema Pat", "A pet?"))
    ip.user_ns["bad"] = 3
    assert "pydantic model class or a JSON schema dict" in one_line_error(chat(ip, "--schema bad", "A pet?"))


def test_chat_with_tools_runs_the_calls_and_shows_them_readably(ip, wide_tiny_model_path):
    from typing import Literal

    mlx(ip, f"load {wide_tiny_model_path} --as tiny")
    ran = []

    def dice(n: Literal[1, 2]) -> int:
        """Roll n dice."""
        ran.append(n)
        return 7

    ip.user_ns["dice"] = dice
    c = chat(ip, "-t 0 --max-tokens 80 --tools dice --tool-choice required", "Roll!")
    turns = conversations(ip)["default"]
    assert ran and f"→ dice(n={ran[0]})" in c.stdout and "← dice: 7" in c.stdout
    assert [t["role"] for t in turns[:2]] == ["user", "assistant"] and turns[-1]["role"] == "assistant"
    assert turns[1]["tool_calls"][0]["function"]["name"] == "dice"
    assert [t["content"] for t in turns if t["role"] == "tool"] == ["7"] * len(ran)


def test_chat_logprobs_shows_each_token_shaded_with_its_alternatives(ip, tiny):
    import math

    c = chat(ip, "-t 0 --max-tokens 4 --logprobs", "Hi")
    expected = tiny.chat([{"role": "user", "content": "Hi"}], temperature=0, max_tokens=4, logprobs=True,
                         top_logprobs=5).logprobs
    shown = c.outputs[-1].data
    assert shown["text/html"].count("<span title=") == len(expected) == 4
    first = expected[0]
    assert f"{math.exp(first.logprob):.1%} | " in shown["text/html"]  # its probability, then the alternatives
    assert shown["text/plain"].splitlines()[0].startswith(f"{first.token!r:20} {math.exp(first.logprob):7.1%}")
    assert shown["text/plain"].count(", ") >= 4 * 4  # five alternatives a token


def test_warm_keeps_a_documents_kv_for_chats_that_start_with_it(ip, tiny, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("The secret colour is blue. " * 8)
    said = mlx(ip, f"warm tiny --file {doc}").stdout
    assert re.match(r"Kept the KV cache of \d+ tokens of .*doc.txt on tiny \(in memory and on disk\)", said)
    asked = tiny.chat([{"role": "system", "content": doc.read_text()}, {"role": "user", "content": "Colour?"}],
                      temperature=0, max_tokens=2)
    assert asked.usage.cached_tokens > 20
    ps = mlx(ip, "ps").outputs[0].data["text/plain"]
    assert "cache on disk" in ps and re.search(r"\d+(\.\d+)? [KM]iB, 0 hits", ps)
    assert "--file: cannot read" in one_line_error(mlx(ip, f"warm tiny --file {tmp_path / 'missing.txt'}"))
