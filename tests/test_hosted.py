"""Hosted Jupyter (JupyterHub, Binder): the server's address through jupyter-server-proxy, for real."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import free_port, raw_http
from jupyter_client import BlockingKernelClient

from mlx_manager_nb.hosted import proxied_url
from mlx_manager_nb.server import serve

TOKEN = "hub-test-token"
PREFIX = "/user/ana/"


def test_no_hub_no_proxied_url():
    assert proxied_url(8000, {}) is None


def test_the_proxied_url_follows_the_hub_environment():
    on_hub = proxied_url(8000, {"JUPYTERHUB_SERVICE_PREFIX": "/user/ana", "JUPYTERHUB_BASE_URL": "/"})
    assert (on_hub.path, on_hub.url, on_hub.root) == ("/user/ana/proxy/8000", None, "/user/ana/proxy/8000")
    assert "/hub/token" in on_hub.auth() and "Authorization: token" in on_hub.auth_text()
    public = proxied_url(8000, {"JUPYTERHUB_SERVICE_PREFIX": "/user/ana/",
                                "JUPYTERHUB_PUBLIC_URL": "https://hub.example.org/user/ana/"})
    assert public.url == "https://hub.example.org/user/ana/proxy/8000"
    binder = proxied_url(8000, {"JUPYTERHUB_SERVICE_PREFIX": "/user/x-y-z/", "BINDER_LAUNCH_HOST": "https://mybinder.org/"})
    assert binder.binder and "?token=" in binder.auth()


def test_on_a_hub_the_proxys_requests_pass_the_host_check_and_a_rebinding_page_still_does_not(pool, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", PREFIX)
    server = serve(pool, port=0, mode="thread")
    try:
        port = server.port
        assert repr(server).endswith(f"through Jupyter at /user/ana/proxy/{port})>")
        context = b"x-forwarded-context: /user/ana/proxy/%d\r\n" % port
        for host, headers, expected in (
                (b"hub.example.org", context, 200),  # what jupyter-server-proxy forwards
                (b"hub.example.org:8888", context, 200),
                (b"hub.example.org", b"", 403),  # not from the proxy
                (b"attacker.example:%d" % port, context, 403),  # a page that reached this port by name
                (b"hub.example.org", b"x-forwarded-context: /user/bob/proxy/%d\r\n" % port, 403)):
            status, _ = raw_http(port, b"GET /health HTTP/1.1\r\nhost: " + host + b"\r\n" + headers)
            assert status == expected, (host, headers)
    finally:
        server.stop(drain=0)
    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX")
    server = serve(pool, port=0, mode="thread")  # off a hub, no proxy is trusted
    try:
        status, _ = raw_http(server.port, b"GET /health HTTP/1.1\r\nhost: hub.example.org\r\n"
                                          b"x-forwarded-context: /user/ana/proxy/%d\r\n" % server.port)
        assert status == 403
    finally:
        server.stop(drain=0)


def _wait_for_jupyter(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stdout.read()
        try:
            with urllib.request.urlopen(f"{url}api/status?token={TOKEN}", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"the Jupyter server at {url} did not start")


def _run(kc: BlockingKernelClient, code: str) -> str:
    out: list[str] = []
    reply = kc.execute_interactive(code, timeout=120, output_hook=lambda m: out.append(
        m["content"].get("text", "") if m["msg_type"] == "stream" else
        "\n".join(m["content"]["traceback"]) if m["msg_type"] == "error" else ""))
    assert reply["content"]["status"] == "ok", "".join(out)
    return "".join(out)


@pytest.fixture
def hub_server(tmp_path, tiny_model_path):
    """A Jupyter server with jupyter-server-proxy, set up as JupyterHub sets up a user's server."""
    pytest.importorskip("jupyter_server_proxy", reason="jupyter-server-proxy is in the demo extra")
    port = free_port()
    public = f"http://hub.example.org:{port}{PREFIX}"  # the address users know it by; resolved below
    env = {**os.environ, "JUPYTERHUB_SERVICE_PREFIX": PREFIX, "JUPYTERHUB_PUBLIC_URL": public,
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_DATA_DIR": str(tmp_path / "data"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "TINY_MODEL": str(tiny_model_path)}
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_server", "--no-browser", f"--port={port}",
                             "--ip=127.0.0.1", "--allow-root", f"--ServerApp.base_url={PREFIX}",
                             "--ServerApp.allow_remote_access=True",
                             f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={tmp_path}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}{PREFIX}"
    try:
        _wait_for_jupyter(url, proc)
        yield url, tmp_path / "runtime"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_mlx_serve_in_a_hub_kernel_answers_the_openai_sdk_through_jupyter_server_proxy(hub_server):
    import httpx
    import openai

    url, runtime = hub_server
    request = urllib.request.Request(f"{url}api/kernels", b"{}", {"Authorization": f"token {TOKEN}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        kernel_id = json.load(r)["id"]
    kc = BlockingKernelClient(connection_file=str(Path(runtime) / f"kernel-{kernel_id}.json"))
    kc.load_connection_file()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        _run(kc, "import os\n%load_ext mlx_manager_nb\n%mlx load {os.environ['TINY_MODEL']} --as tiny")
        printed = _run(kc, "%mlx serve --port 0")
        assert "Through Jupyter, from outside this machine:" in printed and "Authorization: token" in printed
        base = re.search(r"Through Jupyter.*?OpenAI SDK: +base_url=(\S+)", printed, re.S).group(1)
        assert re.fullmatch(r"http://hub\.example\.org:\d+/user/ana/proxy/\d+/v1", base), printed

        def resolve(req: httpx.Request) -> None:  # hub.example.org is this machine; Host stays the public name
            req.url = req.url.copy_with(host="127.0.0.1")

        http = httpx.Client(event_hooks={"request": [resolve]})
        client = openai.OpenAI(base_url=base, api_key="unused", http_client=http, max_retries=0,
                               default_headers={"Authorization": f"token {TOKEN}"})
        reply = client.chat.completions.create(model="tiny", max_tokens=5, temperature=0,
                                               messages=[{"role": "user", "content": "Hello"}])
        assert reply.choices[0].message.content and reply.usage.completion_tokens == 5
        stream = client.chat.completions.create(model="tiny", max_tokens=5, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": "Hello"}])
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == reply.choices[0].message.content  # SSE through the proxy too
        anonymous = openai.OpenAI(base_url=base, api_key="unused", http_client=http, max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:  # the Jupyter server wants its token
            anonymous.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}])
        assert refused.value.status_code in (302, 401, 403)
        _run(kc, "%mlx stop")
    finally:
        kc.stop_channels()
        urllib.request.urlopen(urllib.request.Request(f"{url}api/kernels/{kernel_id}", method="DELETE",
                                                      headers={"Authorization": f"token {TOKEN}"}), timeout=30)
