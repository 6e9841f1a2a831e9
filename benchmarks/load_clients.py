"""HTTP clients for benchmarks/fairness.py, run as separate processes (as external clients are).

    python load_clients.py bystander URL MODEL MAX_TOKENS   # one streamed chat: prints "streaming" at its
                                                            # first token, then its arrival times as JSON
    python load_clients.py posts URL FILE                   # posts every (path, body) of FILE at once
    python load_clients.py unread URL FILE                  # sends each streamed request of FILE, never reads
    python load_clients.py halfopen URL N                   # N connections that never finish their headers

Each load client prepares, prints ``ready``, sends its load once it reads a line on stdin, then runs
until it is killed. The bystander connects from 127.0.0.2 where that is a loopback address (Linux):
the server counts requests per client address, and the loads, from 127.0.0.1, are another client.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp


def _other_address() -> tuple[str, int] | None:
    """127.0.0.2 to connect from, where this machine has it (Linux routes all of 127/8 to loopback)."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return ("127.0.0.2", 0)
    except OSError:
        return None


async def bystander(url: str, model: str, max_tokens: int) -> None:
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]}
    arrivals = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=_other_address())) as session:
        start = time.perf_counter()
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    arrivals.append(time.perf_counter() - start)
                    if len(arrivals) == 1:
                        print("streaming", flush=True)
        print(json.dumps({"arrivals": arrivals, "total": time.perf_counter() - start}))


async def posts(url: str, file: str) -> None:
    requests = json.loads(Path(file).read_text())

    async def one(session: aiohttp.ClientSession, path: str, body: dict) -> None:
        async with session.post(url + path, json=body) as r:
            await r.read()

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        _ready()
        await asyncio.gather(*(one(session, path, body) for path, body in requests), return_exceptions=True)
        await asyncio.sleep(3600)  # hold until killed


def _ready() -> None:
    print("ready", flush=True)
    sys.stdin.readline()


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname, parts.port))


def unread(url: str, file: str) -> None:
    socks = []
    requests = json.loads(Path(file).read_text())
    _ready()
    for path, body in requests:
        data = json.dumps(body).encode()
        s = _connect(url)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills at once
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        socks.append(s)
    time.sleep(3600)


def halfopen(url: str, n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 256)), hard))
    socks = []
    _ready()
    for _ in range(n):
        try:
            s = _connect(url)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            socks.append(s)
        except OSError:  # the server shed it: what it should do past its cap
            pass
    time.sleep(3600)


if __name__ == "__main__":
    kind, url, *rest = sys.argv[1:]
    if kind == "bystander":
        asyncio.run(bystander(url, rest[0], int(rest[1])))
    elif kind == "posts":
        asyncio.run(posts(url, rest[0]))
    elif kind == "unread":
        unread(url, rest[0])
    else:
        halfopen(url, int(rest[0]))
