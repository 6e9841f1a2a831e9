# ruff: noqa: I001  (the benchmarks import common first: it binds the fast BLAS before mlx loads)
"""Prompt processing (prefill) on the demo model: raw mlx-lm against the pool and the compute limit.

    .venv/bin/python benchmarks/prefill.py [--chunks]

For prompts of about 700, 3,000 and 6,000 tokens it prints where a prefill's time goes (the linear
layers, attention alone per layer with mlx-lm's stock attention and with the tiled one of
``mlx_manager_nb.attention``, and the rest), prompt tokens per second and time to first token for
raw ``mlx_lm.stream_generate`` (stock attention) and ``pool.complete`` (tiled attention on CPUs),
and the compute limit: the model's linear-layer FLOPs per token at the matmul GFLOPS measured on
its own shapes in the same run. Targets (issue 28): at least 0.5 of the compute limit at 3,000
tokens; 6,000 tokens at least 0.7x the tok/s of 700; first token of a 3,000-token prompt at least
4x sooner than stock. ``--chunks`` also times a 3,000-token prefill at several chunk sizes.
"""

import random
import sys
import time

from common import demo_path, row  # first: binds the fast BLAS
import mlx.core as mx
import mlx.nn as nn
from mlx_lm import stream_generate
from mlx_lm.utils import dequantize_model, load

from mlx_manager_nb import attention
from mlx_manager_nb.model_pool import Pool

LENGTHS = (700, 3000, 6000)
WORDS = ["harbor", "lantern", "tide", "ledger", "orchard", "copper", "meadow", "signal", "granite", "voyage",
         "cinder", "almanac", "rivet", "quarry", "beacon", "thistle", "pewter", "lattice", "gable", "saffron"]


def prompt_of(tokenizer, n: int, salt: int) -> str:
    """Text of about ``n`` tokens whose beginning differs by ``salt`` (so no prompt cache helps)."""
    rng = random.Random(salt)
    text = f"Note {salt}: " + " ".join(rng.choice(WORDS) for _ in range(n * 2))
    return tokenizer.decode(tokenizer.encode(text)[:n])


def timed(fn, runs: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def linear_shapes(model) -> list[tuple[int, int]]:
    """(in, out) of one transformer layer's linear layers."""
    return [(m.weight.shape[1], m.weight.shape[0]) for _, m in model.layers[0].named_modules()
            if isinstance(m, nn.Linear)]


def linear_seconds(shapes, tokens: int) -> float:
    """Seconds for one layer's linear layers on ``tokens`` rows (float32 matmuls, best of 3)."""
    total = 0.0
    for k, n in shapes:
        x, w = mx.random.normal((tokens, k)), mx.random.normal((n, k))
        mx.eval(x, w)
        total += timed(lambda x=x, w=w: mx.eval(x @ w.T))
    return total


def attention_seconds(model, n: int, chunk: int, tiled: bool) -> float:
    """Seconds in attention for one layer over an ``n``-token prefill in chunks (best of 2 per chunk)."""
    args = model.args
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    dim = args.hidden_size // heads
    fn = attention.causal_attention if tiled else (
        lambda q, k, v, s: mx.fast.scaled_dot_product_attention(q, k, v, scale=s, mask="causal"))
    total = 0.0
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        L = end - start
        q = mx.random.normal((1, heads, L, dim))
        k, v = mx.random.normal((1, kv_heads, end, dim)), mx.random.normal((1, kv_heads, end, dim))
        mx.eval(q, k, v)
        total += timed(lambda q=q, k=k, v=v: mx.eval(fn(q, k, v, dim ** -0.5)), runs=2)
    return total


def raw_prefill(model, tokenizer, text: str, chunk: int = 2048) -> tuple[float, int]:
    """(seconds to the first token, prompt tokens) for raw mlx-lm."""
    start = time.perf_counter()
    first = next(stream_generate(model, tokenizer, text, max_tokens=1, prefill_step_size=chunk))
    return time.perf_counter() - start, first.prompt_tokens


def main() -> None:
    path = demo_path()
    model, tokenizer = load(str(path))[:2]
    model = dequantize_model(model)  # float32 weights, as the pool runs them on CPUs
    model.set_dtype(mx.float32)
    layers = len(model.layers)
    shapes = linear_shapes(model)
    flops_per_token = 2 * layers * sum(k * n for k, n in shapes)
    chunk = attention.PREFILL_CHUNK
    print(f"demo model, float32, {layers} layers, device {mx.default_device()}, prefill chunk {chunk}, "
          f"attention tile {attention.TILE}")

    gflops = flops_per_token / layers * chunk / linear_seconds(shapes, chunk) / 1e9
    limit = gflops * 1e9 / flops_per_token
    row("matmul GFLOPS (the model's linear shapes)", gflops, "GFLOPS")
    row("compute limit (linear layers only)", limit, "tok/s")

    texts = {n: prompt_of(tokenizer, n, salt=n) for n in LENGTHS}
    raw_prefill(model, tokenizer, prompt_of(tokenizer, 200, salt=1))  # warm-up
    raw = {n: raw_prefill(model, tokenizer, texts[n]) for n in LENGTHS}

    print("where one prefill's time goes (all layers, from per-layer timings)")
    for n in LENGTHS:
        lin = layers * sum(linear_seconds(shapes, min(chunk, n - s)) for s in range(0, n, chunk))
        stock, tiled = (layers * attention_seconds(model, n, chunk, t) for t in (False, True))
        total = raw[n][0]
        print(f"  {n:5} tokens: raw prefill {total:6.1f} s = linear {lin:5.1f} s + stock attention {stock:5.1f} s"
              f" + rest {total - lin - stock:5.1f} s;  tiled attention {tiled:5.1f} s ({stock / tiled:.1f}x)",
              flush=True)

    pool = Pool(keep_alive=None)
    pool.load(path)
    pool.complete(prompt_of(tokenizer, 200, salt=2), max_tokens=1, temperature=0)  # warm-up
    ours = {}
    for n in LENGTHS:
        r = pool.complete(prompt_of(tokenizer, n, salt=n + 1), max_tokens=1, temperature=0)
        ours[n] = (r.ttft, r.usage.prompt_tokens)
    pool.close()

    print("prompt tokens per second (time to first token)")
    for n in LENGTHS:
        (rt, rn), (pt, pn) = raw[n], ours[n]
        row(f"raw mlx-lm, {rn} tokens", rn / rt, f"tok/s ({rt:6.2f} s)")
        row(f"pool, {pn} tokens", pn / pt, f"tok/s ({pt:6.2f} s)", (pn / pt) / (rn / rt))
    tps = {n: ours[n][1] / ours[n][0] for n in LENGTHS}
    print("targets")
    row("pool at 3,000 tokens / compute limit", tps[3000], "tok/s", tps[3000] / limit, 0.5)
    row("pool at 6,000 tokens / pool at 700", tps[6000], "tok/s", tps[6000] / tps[700], 0.7)
    row("first token at 3,000 tokens: raw / pool", ours[3000][0], "s", raw[3000][0] / ours[3000][0], 4.0)
    raw_6000 = raw[6000][1] / raw[6000][0]
    row("for comparison, raw at 6,000 / raw at 700", raw_6000, "tok/s", raw_6000 / (raw[700][1] / raw[700][0]))

    if "--chunks" in sys.argv:  # raw mlx-lm's forward passes, now with the tiled attention installed
        print("3,000-token prefill by chunk size (tiled attention)")
        for size in (512, 1024, 2048, 3072):
            seconds, n = raw_prefill(model, tokenizer, prompt_of(tokenizer, 3000, salt=size), chunk=size)
            row(f"chunk {size}", n / seconds, "tok/s")


if __name__ == "__main__":
    main()
