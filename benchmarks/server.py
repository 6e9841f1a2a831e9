# ruff: noqa: I001  (the benchmarks import common first: it binds the fast BLAS before mlx loads)
"""HTTP against the in-process API: the same model and prompt, one client and 8 concurrent, in one run.

    .venv/bin/python benchmarks/server.py

The server runs in thread mode in this process; the HTTP clients are a separate process (as
external clients are) streaming with aiohttp and reading the usage chunk.
Targets: HTTP >= 0.95 x in-process for one client and >= 0.9 x for 8.
"""

import json
import subprocess
import sys
import time

from common import MAX_TOKENS, best_of, concurrently, demo_path, messages, row  # first: binds the fast BLAS

from mlx_manager_nb.model_pool import Pool
from mlx_manager_nb.server import serve


CLIENTS = """
import asyncio, json, sys, time
import aiohttp

async def one(session, url, body):
    async with session.post(url, json=body) as r:
        usage = None
        async for line in r.content:
            if line.startswith(b"data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
        return usage["completion_tokens"]

async def main(url, bodies):
    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(session, url, b) for b in bodies))
        print(sum(tokens) / (time.perf_counter() - start))

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
"""


def main() -> None:
    pool = Pool(keep_alive=None)
    pool.load(demo_path(), alias="demo")
    server = serve(pool, port=0, mode="thread")
    salt = [1000]

    def fresh() -> int:  # a new prompt every time, so the prompt cache flatters neither side
        salt[0] += 1
        return salt[0]

    def in_process(i: int) -> int:
        stream = pool.chat(messages(fresh()), temperature=0, max_tokens=MAX_TOKENS, stream=True)
        for _ in stream:
            pass
        return stream.result.usage.completion_tokens

    def over_http(n: int) -> float:
        bodies = [{"model": "demo", "messages": messages(fresh()), "temperature": 0, "max_tokens": MAX_TOKENS,
                   "stream": True, "stream_options": {"include_usage": True}} for _ in range(n)]
        done = subprocess.run([sys.executable, "-c", CLIENTS, server.url + "/v1/chat/completions",
                               json.dumps(bodies)], capture_output=True, text=True, check=True)
        return float(done.stdout)

    print(f"demo model, {MAX_TOKENS} tokens out, streamed; server at {server.url}")
    for n, target in ((1, 0.95), (8, 0.9)):
        local = best_of(2, lambda n=n: concurrently(n, in_process))
        http = best_of(2, lambda n=n: over_http(n))
        print(f"{n} client{'s' if n > 1 else ''} (aggregate)")
        row("in-process pool.chat(stream=True)", local, "tok/s")
        row("HTTP /v1/chat/completions (streamed, SSE)", http, "tok/s", http / local, target)
    server.stop(drain=0)
    pool.close()


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)")
