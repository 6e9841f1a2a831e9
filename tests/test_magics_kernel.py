"""%%chat in a real IPython kernel: streaming display updates, memory across cells, interrupts, serve."""

import itertools
import json
import subprocess
import sys
import urllib.request

import pytest
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager

TIMEOUT = 60
CONVERSATION = ("import json\n"
                "print(json.dumps(get_ipython().magics_manager.registry['MLXMagics'].conversations[{!r}]))")


def start_kernel(root, tiny_model_path):
    """A kernel on this venv's python (a kernelspec in a temp dir), with the tiny model loaded."""
    spec = root / "kernels" / "mlx-nb-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mlx-nb test", "language": "python",
        "env": {"MLX_NB_HOME": str(root / "home"), "TINY_MODEL": str(tiny_model_path)},
    }))
    specs = KernelSpecManager(kernel_dirs=[str(root / "kernels")])
    km = KernelManager(kernel_name="mlx-nb-test", kernel_spec_manager=specs)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=TIMEOUT)
    execute(kc, "import os")
    reply, msgs = execute(kc, "%load_ext mlx_manager_nb\n%mlx load {os.environ['TINY_MODEL']} --as tiny")
    assert reply["content"]["status"] == "ok"
    return km, kc, msgs


@pytest.fixture(scope="module")
def kernel(tmp_path_factory, tiny_model_path):
    km, kc, msgs = start_kernel(tmp_path_factory.mktemp("kernel"), tiny_model_path)
    yield km, kc, msgs
    kc.stop_channels()
    km.shutdown_kernel(now=True)


def execute(kc, code, on_message=None):
    """Run `code`; return its execute_reply and its iopub messages (until idle)."""
    msg_id = kc.execute(code)
    msgs = []
    while True:
        msg = kc.get_iopub_msg(timeout=TIMEOUT)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status":
            if msg["content"]["execution_state"] == "idle":
                break
            continue
        msgs.append(msg)
        if on_message:
            on_message(msg)
    while True:
        reply = kc.get_shell_msg(timeout=TIMEOUT)
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply, msgs


def of_type(msgs, *types):
    return [m for m in msgs if m["msg_type"] in types]


def shown(kc, code):
    """The plain text of what the cell displayed."""
    reply, msgs = execute(kc, code)
    assert reply["content"]["status"] == "ok", reply["content"]
    return "\n".join(m["content"]["data"]["text/plain"] for m in of_type(msgs, "display_data"))


def printed(kc, code):
    """What the cell printed on stdout."""
    reply, msgs = execute(kc, code)
    assert reply["content"]["status"] == "ok", reply["content"]
    return "".join(m["content"]["text"] for m in of_type(msgs, "stream") if m["content"]["name"] == "stdout")


def test_load_ext_banner_and_load_progress(kernel):
    _, _, msgs = kernel
    assert "0 models loaded" in of_type(msgs, "stream")[0]["content"]["text"]
    bars = of_type(msgs, "display_data", "update_display_data")
    assert "<progress" in bars[0]["content"]["data"]["text/html"]
    assert bars[-1]["msg_type"] == "update_display_data"
    assert bars[-1]["content"]["data"]["text/plain"].startswith("Loaded tiny-llama as 'tiny'")


def test_answer_streams_in_place_then_a_footer_and_memory_spans_cells(kernel):
    _, kc, _ = kernel
    reply, msgs = execute(kc, "%%chat -t 0 --max-tokens 300 --name story\nTell me a story")
    assert reply["content"]["status"] == "ok"
    first, *updates = of_type(msgs, "display_data", "update_display_data")[:-1]
    display_id = first["content"]["transient"]["display_id"]
    assert len(updates) >= 3  # several in-place updates before the cell ended...
    assert all(u["msg_type"] == "update_display_data" and u["content"]["transient"]["display_id"] == display_id
               for u in updates)
    texts = [u["content"]["data"]["text/markdown"] for u in updates]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # ...each a longer prefix of the answer
    footer = of_type(msgs, "display_data")[-1]["content"]["data"]["text/plain"]
    assert footer.startswith("tiny · 300 tokens · first token") and "tokens/s" in footer

    conv = json.loads(printed(kc, CONVERSATION.format("story")))
    assert conv == [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": texts[-1]}]


def test_a_conversation_continues_across_cells(kernel):
    _, kc, _ = kernel
    execute(kc, "%%chat -t 0 --max-tokens 5 --name memo\nHello")
    execute(kc, "%%chat -t 0 --max-tokens 5 --name memo\nAnd then?")
    conv = json.loads(printed(kc, CONVERSATION.format("memo")))
    assert [m["role"] for m in conv] == ["user", "assistant"] * 2
    assert [m["content"] for m in conv[::2]] == ["Hello", "And then?"]


def test_format_code_sends_a_set_next_input_payload(kernel):
    _, kc, _ = kernel
    reply, _ = execute(kc, "%%chat -t 0 --max-tokens 5 --format code --name code\nWrite code")
    payload = reply["content"]["payload"]
    assert len(payload) == 1 and payload[0]["source"] == "set_next_input" and payload[0]["replace"] is False
    assert payload[0]["text"]


def test_an_interrupt_stops_generation_and_keeps_the_partial_answer(kernel):
    km, kc, _ = kernel
    sent = []

    def interrupt_on_first_update(msg):
        if msg["msg_type"] == "update_display_data" and not sent:
            km.interrupt_kernel()
            sent.append(msg)

    reply, msgs = execute(kc, "%%chat -t 0 --max-tokens 480 --name long\nTell me a long story",
                          on_message=interrupt_on_first_update)
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "Interrupted"
    error = of_type(msgs, "error")[0]["content"]
    assert error["traceback"] == [
        "KeyboardInterrupt: generation stopped; the partial answer is kept in conversation 'long'"]
    shown = of_type(msgs, "update_display_data")[-1]["content"]["data"]["text/markdown"]
    state = json.loads(printed(kc, """
import json, time
import mlx_manager_nb
pool, audit = mlx_manager_nb.pool, mlx_manager_nb.audit
end = time.time() + 5
while (pool.models()[0].in_flight or not audit.query(source="magic", status="cancelled")) and time.time() < end:
    time.sleep(0.01)
row = audit.query(source="magic", status="cancelled")[0]
conv = get_ipython().magics_manager.registry["MLXMagics"].conversations["long"]
print(json.dumps({"partial": conv[-1]["content"], "in_flight": pool.models()[0].in_flight,
                  "tokens": row["completion_tokens"]}))
"""))
    assert state["partial"] == shown and shown
    assert state["in_flight"] == 0 and state["tokens"] < 480
    assert "tiny · 5 tokens" in of_type(execute(kc, "%%chat -t 0 --max-tokens 5\nStill there?")[1],
                                        "display_data")[-1]["content"]["data"]["text/plain"]


def test_the_pool_panels_loading_bar_clears_after_a_load_from_a_cell(kernel):
    """The engine thread's progress events and the cell's own "ready" event reach the bar in order."""
    _, kc, _ = kernel
    printed(kc, "import asyncio\nimport mlx_manager_nb as mnb\nfrom mlx_manager_nb.widgets import pool_panel\n"
                "panel = pool_panel(mnb.pool)\nmnb.pool.unload('tiny')")
    printed(kc, "mnb.pool.load(os.environ['TINY_MODEL'], alias='tiny')")
    out = printed(kc, "await asyncio.sleep(0.5)  # whatever the engine thread queued has run\n"
                      "print(panel.children[4].layout.display, '|', panel.parts.progress_text.value)")
    assert out.startswith("none |"), out
    assert "tiny · 1 token" in shown(kc, "%%chat -t 0 --max-tokens 1\nHi")  # served as before


def test_serve_runs_on_the_kernel_loop(kernel):
    _, kc, _ = kernel
    out = printed(kc, "%mlx serve --port 0")
    assert out.startswith("Serving at http://127.0.0.1:")
    url = out.split()[2].rstrip(".")
    assert f"{url} (kernel mode)" in shown(kc, "%mlx status")
    assert json.load(urllib.request.urlopen(url + "/health", timeout=10))
    # a separate process calls the idle kernel's server with the official SDK
    client = (f"import openai; c = openai.OpenAI(base_url={url + '/v1'!r}, api_key='x'); "
              "r = c.chat.completions.create(model='tiny', messages=[{'role': 'user', 'content': 'Hi'}], "
              "max_tokens=5); print(r.usage.completion_tokens)")
    done = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "5", done.stderr
    assert printed(kc, "print(6 * 7)").strip() == "42"  # the kernel still runs cells
    assert "is stopping" in printed(kc, "%mlx stop")
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=5)


def test_kernel_shutdown_stops_the_server(tmp_path, tiny_model_path):
    km, kc, _ = start_kernel(tmp_path, tiny_model_path)
    url = printed(kc, "%mlx serve --port 0").split()[2].rstrip(".")
    assert json.load(urllib.request.urlopen(url + "/health", timeout=10))
    kc.stop_channels()
    km.shutdown_kernel(now=False)  # a normal shutdown, as Jupyter's "Shut Down Kernel" does
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "/health", timeout=5)


def test_chat_image_sends_a_figure_variable_and_a_text_only_model_refuses_it_readably(kernel):
    _, kc, _ = kernel
    execute(kc, "from matplotlib.figure import Figure\nfig = Figure(figsize=(2, 2))\nfig.add_subplot().plot([1, 3, 2])")
    reply, msgs = execute(kc, "%%chat tiny --name plot --image fig\nWhat does this plot show?")
    assert reply["content"]["status"] == "ok"  # a readable one-line error, not a traceback
    errors = "".join(m["content"]["text"] for m in of_type(msgs, "stream") if m["content"]["name"] == "stderr")
    assert errors == ("InvalidParameterError: model 'tiny' does not take images (messages[0].content[1]); "
                      "send them to a vision model\n")
