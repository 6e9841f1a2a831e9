"""A local stand-in for the Hugging Face hub's HTTP API, served from a thread on 127.0.0.1.

It answers the search listing (``/api/models``), a repo's info with its files and sizes
(``/api/models/{org}/{name}/revision/{rev}``) and file downloads with ``Range`` requests
(``/{org}/{name}/resolve/{rev}/{file}``); a gated repo answers 401 without a token. It counts the
file bytes it sends, so a test can tell what a resumed pull fetched; it can send files slowly
(``pace``) and drop the connection in the middle of a file (``drop``).
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    sha: str = "first-commit"
    downloads: int = 0
    likes: int = 0
    tags: list[str] = field(default_factory=list)
    listed_sizes: bool = True  # whether the search listing gives its files' sizes


class HubStandIn:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.served = 0  # file bytes sent
        self.token: str | None = None  # the token a gated repo accepts
        self.drop: tuple[str, int] | None = None  # (file, offset): the next download of it ends there, cut off
        self.pace = 0.0  # seconds to wait after each 64 KiB of a file sent
        app = web.Application()
        app.router.add_get("/api/models", self.listing)
        app.router.add_get("/api/models/{org}/{name}/revision/{rev}", self.info)
        app.router.add_get("/{org}/{name}/resolve/{rev}/{file}", self.resolve)
        self.runner = web.AppRunner(app)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        self.run(self.runner.setup())
        self.run(web.SockSite(self.runner, sock).start())
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.run(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)

    def add(self, repo: str, folder: Path | None = None, files: dict[str, bytes] | None = None, **kw) -> None:
        content = {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder else {}
        self.repos[repo] = Repo({**content, **(files or {})}, **kw)

    def _repo(self, request: web.Request) -> Repo:
        repo = self.repos.get(f"{request.match_info['org']}/{request.match_info['name']}")
        if repo is None:
            raise web.HTTPNotFound(text='{"error": "Repository not found"}')
        if repo.gated and request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized(text='{"error": "Access to this model is restricted"}')
        return repo

    async def listing(self, request: web.Request) -> web.Response:
        q = request.query.get("search", "").lower()
        author = request.query.get("author")
        found = [(rid, r) for rid, r in self.repos.items()
                 if q in rid.lower() and (author is None or rid.startswith(author + "/"))]
        found.sort(key=lambda item: -item[1].downloads)
        rows = [{"id": rid, "_id": rid, "downloads": r.downloads, "likes": r.likes, "tags": r.tags,
                 "lastModified": "2026-11-02T10:00:00.000Z", "usedStorage": 7 * sum(map(len, r.files.values())),
                 "siblings": [{"rfilename": f, **({"size": len(d)} if r.listed_sizes else {})}
                              for f, d in r.files.items()],
                 "safetensors": {"total": 1_230_000_000, "parameters": {"BF16": 1_230_000_000}}}
                for rid, r in found[: int(request.query.get("limit", 1000))]]
        return web.json_response(rows)

    async def info(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        siblings = [{"rfilename": name, "size": len(data)} for name, data in repo.files.items()]
        return web.json_response({"id": f"{request.match_info['org']}/{request.match_info['name']}",
                                  "sha": repo.sha, "siblings": siblings})

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        data = self._repo(request).files.get(name)
        if data is None:
            raise web.HTTPNotFound()
        m = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))
        start = int(m.group(1)) if m else 0
        headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"} if m else {}
        end = len(data)
        if self.drop is not None and self.drop[0] == name:
            end, self.drop = self.drop[1], None
        elif not self.pace:
            self.served += len(data) - start
            return web.Response(status=206 if m else 200, body=data[start:], headers=headers)
        response = web.StreamResponse(status=206 if m else 200, headers=headers)
        response.content_length = len(data) - start
        await response.prepare(request)
        for at in range(start, end, 1 << 16):
            piece = data[at: min(at + (1 << 16), end)]
            await response.write(piece)
            self.served += len(piece)
            await asyncio.sleep(self.pace)
        if end < len(data):
            assert request.transport is not None
            request.transport.close()  # sends what is buffered, then the connection is gone mid-file
        else:
            await response.write_eof()
        return response
