# ruff: noqa: I001  (the benchmarks import common first: it binds the fast BLAS before mlx loads)
"""Embedding throughput of the pool on demo-embed (all-MiniLM-L6-v2), against sentence-transformers.

    .venv/bin/python benchmarks/embeddings.py [--st-python PYTHON]

- pool: 1, 8 and 64 concurrent callers, each embedding one text per call (they share forward passes),
  the same 64 callers with batching off (one text per forward pass), and one call with every text;
- sentence-transformers on the same CPU, in a separate process (``--st-python`` names a Python that
  has it, e.g. a throwaway venv with ``pip install sentence-transformers``; it pulls PyTorch): one
  text per ``encode`` from 1, 8 and 64 threads, and one ``encode`` of every text (batch size 32).
Figures are texts per second, the median of 3 runs after a warm-up.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import best_of, concurrently  # first: binds the fast BLAS
from mlx_manager_nb import embeddings
from mlx_manager_nb.model_pool import Pool
from mlx_manager_nb.store import resolve

REFERENCE = Path(__file__).parent.parent / "tests" / "fixtures" / "make_minilm_reference.py"
N_TEXTS = 256
CALLERS = (1, 8, 64)

ST = """
import json, statistics, sys, threading, time
import torch
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], device="cpu")
texts = json.loads(sys.argv[2])
def callers(n):
    def run(i):
        for t in texts[i::n]:
            model.encode(t)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join()
    return len(texts) / (time.perf_counter() - start)
def batch():
    start = time.perf_counter()
    model.encode(texts, batch_size=32)
    return len(texts) / (time.perf_counter() - start)
def best(fn):
    fn()
    return statistics.median(fn() for _ in range(3))
out = {f"{n} callers": best(lambda: callers(n)) for n in (1, 8, 64)}
out["one call"] = best(batch)
out["torch threads"] = torch.get_num_threads()
print(json.dumps(out))
"""


def texts() -> list[str]:
    """N_TEXTS texts of 2 to ~120 tokens: the reference sentences, cut at varied lengths."""
    namespace: dict = {}
    source = REFERENCE.read_text().split('if __name__ == "__main__":')[0]
    exec(source.replace("from sentence_transformers import SentenceTransformer", ""), namespace)
    base = [s[:400] for s in namespace["SENTENCES"]]
    return [f"{base[i % len(base)][: 20 + (i * 37) % 380]} ({i})" for i in range(N_TEXTS)]


def pool_callers(pool: Pool, items: list[str], n: int) -> float:
    def run(i: int) -> int:
        for t in items[i::n]:
            pool.embed(t, model="demo-embed")
        return len(items[i::n])

    return concurrently(n, run)


def pool_one_call(pool: Pool, items: list[str]) -> float:
    start = time.perf_counter()
    pool.embed(items, model="demo-embed")
    return len(items) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--st-python", help="a Python with sentence-transformers installed")
    args = parser.parse_args()
    items = texts()
    pool = Pool(keep_alive=None)
    pool.load("demo-embed")
    results = {f"pool, {n} callers": best_of(3, lambda n=n: pool_callers(pool, items, n)) for n in CALLERS}
    budget, embeddings.BATCH_TOKENS = embeddings.BATCH_TOKENS, 0  # every text alone in its forward pass
    results["pool, 64 callers, one text per pass"] = best_of(3, lambda: pool_callers(pool, items, 64))
    embeddings.BATCH_TOKENS = budget
    results["pool, one call"] = best_of(3, lambda: pool_one_call(pool, items))
    if args.st_python:
        done = subprocess.run([args.st_python, "-c", ST, str(resolve("demo-embed")), json.dumps(items)],
                              capture_output=True, text=True, check=True)
        st = json.loads(done.stdout.strip().splitlines()[-1])
        threads = st.pop("torch threads")
        results.update({f"sentence-transformers ({threads} torch threads), {k}": v for k, v in st.items()})
    pool.close()
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:{width}}  {value:8.1f} texts/s")
    gain = results["pool, 64 callers"] / results["pool, 64 callers, one text per pass"]
    print(f"batching gain at 64 callers: {gain:.1f}x")


if __name__ == "__main__":
    sys.exit(main())
