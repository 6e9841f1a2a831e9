"""Log-probabilities on the demo model.

- Their cost in a batch: 8 concurrent greedy chats with ``top_logprobs=5`` against the same without
  (target: within 10% of the aggregate tokens/s).
- Scoring: ``pool.score`` of 256 (context, continuation) pairs in one call against the same pairs as 256
  HTTP requests (``/v1/completions`` with ``echo: true, max_tokens: 0, logprobs: 1``, as lm-eval scores,
  8 at a time, from another process), in pairs per second.

Run from the repository root: ``.venv/bin/python benchmarks/logprobs.py [max_tokens]``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from common import MAX_TOKENS, best_of, concurrently, demo_path, messages, row  # first: binds the fast BLAS

from mlx_manager_nb.model_pool import Pool
from mlx_manager_nb.server import serve

CONCURRENT = 8
PAIRS = 256
HTTP_AT_ONCE = 8  # requests in flight at a time

CLIENTS = """
import asyncio, json, sys, time
import aiohttp

async def main(url, bodies, at_once):
    gate = asyncio.Semaphore(at_once)
    async with aiohttp.ClientSession() as session:
        async def one(body):
            async with gate, session.post(url, json=body) as r:
                return (await r.json())["choices"][0]["logprobs"]["token_logprobs"]
        start = time.perf_counter()
        answers = await asyncio.gather(*(one(b) for b in bodies))
        print(json.dumps([time.perf_counter() - start, answers]))

asyncio.run(main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])))
"""


def pairs(salt: int) -> list[tuple[str, str]]:
    """Short multiple-choice items: a question and one of its answers."""
    return [(f"Question {salt + i}: which number is larger, {i} or {i + 7}? Answer:", f" {i + 7 * (i % 2)}")
            for i in range(PAIRS)]


def scoring(pool: Pool) -> None:
    """``pool.score`` of PAIRS pairs in one call against the same as PAIRS HTTP requests, in pairs per second."""
    server = serve(pool, port=0, mode="thread")
    try:
        items = pairs(0)
        pool.score(*map(list, zip(*pairs(10_000), strict=True)))  # warm-up, other texts
        start = time.perf_counter()
        scores = pool.score([c for c, _ in items], continuation=[x for _, x in items])
        in_process = PAIRS / (time.perf_counter() - start)
        bodies = [{"model": "demo", "prompt": c + x, "echo": True, "max_tokens": 0, "logprobs": 1} for c, x in items]
        out = subprocess.run([sys.executable, "-c", CLIENTS, server.url + "/v1/completions", json.dumps(bodies),
                              str(HTTP_AT_ONCE)], capture_output=True, text=True, check=True).stdout
        seconds, answers = json.loads(out)
        over_http = PAIRS / seconds
        apart = max(abs(sum(a[-len(s.tokens):]) - s.logprob) for a, s in zip(answers, scores, strict=True))
    finally:
        server.stop()
    print(f"demo model, {PAIRS} (context, continuation) pairs; the two agree within {apart:.1e}")
    row(f"{PAIRS} HTTP requests, echo, {HTTP_AT_ONCE} at a time", over_http, "pairs/s")
    row("pool.score, one call", in_process, "pairs/s", in_process / over_http)


def main() -> None:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else MAX_TOKENS
    pool = Pool(keep_alive=None)
    pool.load(demo_path(), alias="demo")
    salt = [100]

    def batch(**kw: object) -> float:
        salt[0] += CONCURRENT  # new prompts each time, so the prompt cache flatters neither side
        base = salt[0]

        def one(i: int) -> int:
            return pool.chat(messages(base + i), temperature=0, max_tokens=tokens, **kw).usage.completion_tokens

        return concurrently(CONCURRENT, one)

    plain = best_of(2, batch)
    with_logprobs = best_of(2, lambda: batch(logprobs=True, top_logprobs=5))
    print(f"demo model, {CONCURRENT} concurrent greedy chats, {tokens} tokens out")
    row("without logprobs", plain, "tok/s")
    row("with logprobs, top_logprobs=5", with_logprobs, "tok/s", with_logprobs / plain, target=0.9)
    scoring(pool)
    pool.close()


if __name__ == "__main__":
    main()
