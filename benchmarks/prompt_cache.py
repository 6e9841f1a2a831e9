"""The prompt cache on disk, on the demo model: time to first token of a 4,000-token prompt.

    .venv/bin/python benchmarks/prompt_cache.py           # all four
    .venv/bin/python benchmarks/prompt_cache.py d 1000    # (d) alone, with a 1,000-token system prompt

(a) cold; (b) the same document with another question, from the in-memory cache; (c) in a new pool
on the same home and in a new Python process on it (what a kernel restart finds: the KV read from
``$MLX_NB_HOME/kv/``, the file most likely in the OS page cache); and the disk bytes per 1,000
tokens; (d) 8 requests sharing a 3,000-token system prompt, with different questions, sent together:
the prompt tokens computed and the time until all 8 have their first token, with shared prefixes and
without (``SHARED_PREFIX_MIN`` out of reach: each prefills the system prompt). Targets (issue 26): (c)
at least 5x sooner than (a); (d) about one prompt's tokens computed.
"""

import functools
import json
import subprocess
import sys

from common import concurrently, demo_path, row  # first: binds the fast BLAS

from mlx_manager_nb import shared_prefix
from mlx_manager_nb.model_pool import Pool
from mlx_manager_nb.store import home

TOKENS = 4000
SHARED_TOKENS = 3000
REQUESTS = 8
WORDS = ["harbor", "lantern", "tide", "ledger", "orchard", "copper", "meadow", "signal", "granite", "voyage"]


def question(doc: str, i: int) -> str:
    return f"{doc}\nQuestion {i}: which word comes first?"


def ask(pool: Pool, doc: str, i: int) -> tuple[float, int, int]:
    """Time to first token of ``doc`` and a question; the prompt's tokens, and those the prompt cache gave."""
    r = pool.complete(question(doc, i), max_tokens=1, temperature=0)
    return r.ttft or 0.0, r.usage.prompt_tokens, r.usage.cached_tokens


def document(pool: Pool, name: str, tokens: int) -> str:
    """Text of about ``tokens`` tokens of the model ``name``."""
    tokenizer = pool.runner(name).tokenizer
    return tokenizer.decode(tokenizer.encode(" ".join(WORDS[i % 7 * i % 10] for i in range(tokens * 2)))[:tokens])


def together(pool: Pool, doc: str) -> tuple[float, int, int]:
    """:data:`REQUESTS` questions about ``doc`` sent at once: seconds until all have their first token, the
    prompt tokens computed, and the tokens of one prompt."""
    results: list = [None] * REQUESTS

    def ask_one(i: int) -> int:
        results[i] = pool.complete(question(doc, i), max_tokens=1, temperature=0)
        return 1

    took = REQUESTS / concurrently(REQUESTS, ask_one)  # requests per second
    return took, sum(r.usage.prompt_tokens - r.usage.cached_tokens for r in results), results[0].usage.prompt_tokens


NEW_PROCESS = """
import json, sys
import mlx_manager_nb
from mlx_manager_nb.model_pool import Pool
pool = Pool(keep_alive=None)
pool.load(sys.argv[1])
r = pool.complete(sys.argv[2], max_tokens=1, temperature=0)
print(json.dumps([r.ttft, r.usage.cached_tokens]))
pool.close()
"""


def in_new_process(doc: str, i: int) -> tuple[float, int]:
    """Time to first token of ``doc`` and a question in a new Python process on the same home (a kernel
    restart), and the tokens its prompt cache gave."""
    out = subprocess.run([sys.executable, "-c", NEW_PROCESS, str(demo_path()), question(doc, i)],
                         capture_output=True, text=True, check=True).stdout
    ttft, cached = json.loads(out.strip().splitlines()[-1])
    return ttft, cached


def shared(tokens: int) -> None:
    """(d): with shared prefixes, then without, each from an empty prompt cache (the disk tier off)."""
    pool = Pool(keep_alive=None, kv_disk_bytes=0)
    name = pool.load(demo_path()).name
    doc = document(pool, name, tokens)
    ask(pool, doc, REQUESTS)  # the first long forward passes of a model are slower
    cache = pool.runner(name).prompt_cache
    pool.engine.run(functools.partial(cache.trim_to, n_sequences=0)).result()
    with_sharing, computed, one = together(pool, doc)
    pool.engine.run(functools.partial(cache.trim_to, n_sequences=0)).result()
    shared_prefix.SHARED_PREFIX_MIN = 10**9
    without, computed_without, _ = together(pool, doc)
    pool.close()
    print(f"demo model, {REQUESTS} requests sent together: a {tokens}-token system prompt and a question "
          f"({one} tokens each)")
    row("(d) without sharing: all first tokens", without * 1000, "ms")
    row("(d) shared prefix: all first tokens", with_sharing * 1000, "ms", without / max(with_sharing, 1e-9))
    row("(d) without sharing: prompt tokens computed", computed_without, "tokens", computed_without / one)
    row("(d) shared prefix: prompt tokens computed", computed, "tokens", computed / one)


def main() -> None:
    if sys.argv[1:2] == ["d"]:
        shared(int(sys.argv[2]) if len(sys.argv) > 2 else SHARED_TOKENS)
        return
    pool = Pool(keep_alive=None)
    info = pool.load(demo_path())
    doc = document(pool, info.name, TOKENS)
    cold, tokens, _ = ask(pool, doc, 0)
    memory, _, from_memory = ask(pool, doc, 1)
    pool.close()  # its files are written: one per answer (the two prompts differ at the question)
    files = list((home() / "kv").glob("*/*.safetensors"))
    per_1000 = sum(f.stat().st_size for f in files) / len(files) / ((tokens + 1) / 1000)
    pool = Pool(keep_alive=None)
    pool.load(demo_path())
    disk, _, from_disk = ask(pool, doc, 2)
    hits = pool.models()[0].disk_hits
    pool.close()
    restarted, from_restart = in_new_process(doc, 3)
    print(f"demo model, a {TOKENS}-token document and a question; {len(files)} file(s) on disk")
    row("(a) cold: time to first token", cold * 1000, "ms")
    row(f"(b) in-memory hit ({from_memory} tokens cached)", memory * 1000, "ms", cold / max(memory, 1e-9))
    row(f"(c) new pool, disk hit ({from_disk} tokens cached, {hits} read)", disk * 1000, "ms",
        cold / max(disk, 1e-9), 5.0)
    row(f"(c) new process, disk hit ({from_restart} tokens cached)", restarted * 1000, "ms",
        cold / max(restarted, 1e-9), 5.0)
    row("disk bytes per 1,000 tokens", per_1000 / 2**20, "MiB")
    shared(SHARED_TOKENS)


if __name__ == "__main__":
    main()
