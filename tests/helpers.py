"""Small helpers the test modules share."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).parent.parent
HI = [{"role": "user", "content": "Hi"}]
BYSTANDER = {"model": "tiny", "messages": HI, "max_tokens": 24, "temperature": 0, "stream": True}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=10.0):
    """Poll `predicate` until it is true or `timeout` seconds pass; return whether it came true."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def call(url, body=None, headers=None, method="POST", raw=None):
    """One HTTP request with the standard library (JSON unless ``raw``): (status, headers, parsed body)."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def raw_http(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes as they are (headers a client library would refuse); return (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    status = int(reply.split(b" ", 2)[1])
    return status, reply.split(b"\r\n\r\n", 1)[1]


@contextlib.contextmanager
def make_lab(work: Path, config: Path, token: str, env: dict[str, str] | None = None):
    """``make lab`` as users run it, on working copies in ``work``: yield its URL, then stop it.

    Jupyter's own folders go under ``config``; the Makefile's venv is this interpreter's, taken as
    built (``-o``), and the server answers only on 127.0.0.1 with ``token``.
    """
    port = free_port()
    env = {**os.environ, **(env or {})}
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTERLAB_SETTINGS_DIR",
                 "JUPYTERLAB_WORKSPACES_DIR"):
        env.setdefault(name, str(config / name.lower()))
    args = f"--no-browser --port={port} --ip=127.0.0.1 --IdentityProvider.token={token}"
    config.mkdir(parents=True, exist_ok=True)
    with open(config / "lab.log", "w") as log:
        proc = subprocess.Popen(["make", "-C", str(ROOT), "lab", "-o", f"{sys.prefix}/.demo", f"VENV={sys.prefix}",
                                 f"LAB_DIR={work}", f"LAB_ARGS={args}"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"make lab stopped:\n{(config / 'lab.log').read_text()}"
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                assert time.monotonic() < end, "JupyterLab did not start"
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@contextlib.contextmanager
def slow_upload(port: int, model: str = "tiny"):
    """A chat request from 127.0.0.1 whose body has not all arrived: it runs (holding its client's slot)
    until the block ends, when the rest is sent; yields a list that then holds the status it got."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                       "temperature": 0}).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
              b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body[:10])
    status = []
    try:
        yield status
    finally:
        s.sendall(body[10:])
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        s.close()
        status.append(int(reply.split(b" ", 2)[1]))


async def _bystander(http: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    """One streamed chat; returns its text and finish reason, failing on any error event."""
    text, finish = "", None
    async with http.post(url + "/v1/chat/completions", json=BYSTANDER) as r:
        assert r.status == 200
        async for line in r.content:
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                if chunk["choices"]:
                    text += chunk["choices"][0]["delta"].get("content") or ""
                    finish = chunk["choices"][0]["finish_reason"] or finish
    return text, finish


def with_bystanders(server, pool, hostile, n=3):
    """Run ``hostile(http)`` while n greedy streams run on the tiny model; check they all finish whole;
    return its result."""
    expected = pool.chat(HI, max_tokens=24, temperature=0).text

    async def main():
        async with aiohttp.ClientSession() as http:
            tasks = [asyncio.create_task(_bystander(http, server.url)) for _ in range(n)]
            await asyncio.sleep(0.05)
            result = await hostile(http)
            outcomes = await asyncio.gather(*tasks)
        return result, outcomes

    result, outcomes = asyncio.run(main())
    assert outcomes == [(expected, "length")] * n
    return result
