"""The command line: `python -m mlx_manager_nb serve` serves from a terminal and stops on Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import urllib.request

import openai
import pytest
from helpers import free_port, wait_for


def test_serve_from_a_terminal_then_ctrl_c(tiny_model_path, isolated_home, ctrl_c_works):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_manager_nb", "serve", "--model", str(tiny_model_path), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        def healthy():
            try:
                return json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2))
            except OSError:
                return None

        assert wait_for(healthy, timeout=60)
        assert healthy()["models"] == ["tiny-llama"]
        body = json.dumps({"model": "tiny-llama", "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]})
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/messages", data=body.encode(),
                                         headers={"content-type": "application/json"})
        assert json.load(urllib.request.urlopen(request, timeout=30))["usage"]["output_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert f"base_url=http://127.0.0.1:{port}/v1" in out and "Stopping" in out


def test_sigterm_with_a_short_drain_ends_a_cut_stream_with_an_error_the_sdk_raises(wide_tiny_model_path,
                                                                                  isolated_home):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_manager_nb", "serve", "--model", str(wide_tiny_model_path), "--port", str(port),
         "--drain", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert wait_for(lambda: _healthy(port), timeout=60)
        stream = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4000, temperature=0, stream=True)
        next(iter(stream))  # read no further for now: it runs, then waits parked, when the signal comes
        proc.send_signal(signal.SIGTERM)
        with pytest.raises(openai.APIError, match="server stopped"):
            list(stream)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # the test failed before the stop ended
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out


def _healthy(port: int) -> bool:
    try:
        return json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2))["status"] == "ok"
    except OSError:
        return False


def test_a_bad_model_is_one_line_and_a_non_zero_exit(isolated_home):
    done = subprocess.run([sys.executable, "-m", "mlx_manager_nb", "serve", "--model", "no-such-model"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: No model named 'no-such-model'")


@pytest.mark.slow
def test_the_demo_command_runs_the_serving_story(demo_home, tmp_path):
    """`make demo`'s command: a real kernel serves the demo model to both SDKs and shows its audit rows,
    all in a scratch home: the user's own is never created or written."""
    users_home = tmp_path / "users-home"
    done = subprocess.run([sys.executable, "-m", "mlx_manager_nb", "demo"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "MLX_NB_HOME": str(users_home)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert not users_home.exists()
    assert "without encryption" not in done.stdout + done.stderr  # the kernel talks over private IPC sockets
    assert "The capital of France is Paris." in done.stdout
    assert "The kernel still runs cells while it serves: 42" in done.stdout
    rows = done.stdout.split("(newest first):")[1]
    assert "/v1/messages           anthropic True   ok" in rows and "/v1/chat/completions   openai" in rows
