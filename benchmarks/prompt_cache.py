"""The prompt cache on disk, on the demo model: time to first token of a 4,000-token prompt.

    .venv/bin/python benchmarks/prompt_cache.py

(a) cold; (b) the same document with another question, from the in-memory cache; (c) in a new pool
on the same home (what a kernel restart finds: the KV read from ``$MLX_NB_HOME/kv/``, the file most
likely in the OS page cache); and the disk bytes per 1,000 tokens. Target (issue 26): (c) at least
5x sooner than (a).
"""

from common import demo_path, row  # first: binds the fast BLAS

from mlx_manager_nb.model_pool import Pool
from mlx_manager_nb.store import home

TOKENS = 4000
WORDS = ["harbor", "lantern", "tide", "ledger", "orchard", "copper", "meadow", "signal", "granite", "voyage"]


def ask(pool: Pool, doc: str, question: int) -> tuple[float, int, int]:
    """Time to first token of ``doc`` and a question; the prompt's tokens, and those the prompt cache gave."""
    r = pool.complete(f"{doc}\nQuestion {question}: which word comes first?", max_tokens=1, temperature=0)
    return r.ttft or 0.0, r.usage.prompt_tokens, r.usage.cached_tokens


def main() -> None:
    pool = Pool(keep_alive=None)
    info = pool.load(demo_path())
    tokenizer = pool.runner(info.name).tokenizer
    doc = tokenizer.decode(tokenizer.encode(" ".join(WORDS[i % 7 * i % 10] for i in range(TOKENS * 2)))[:TOKENS])
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
    print(f"demo model, a {TOKENS}-token document and a question; {len(files)} file(s) on disk")
    row("(a) cold: time to first token", cold * 1000, "ms")
    row(f"(b) in-memory hit ({from_memory} tokens cached)", memory * 1000, "ms", cold / max(memory, 1e-9))
    row(f"(c) new pool, disk hit ({from_disk} tokens cached, {hits} read)", disk * 1000, "ms",
        cold / max(disk, 1e-9), 5.0)
    row("disk bytes per 1,000 tokens", per_1000 / 2**20, "MiB")


if __name__ == "__main__":
    main()
