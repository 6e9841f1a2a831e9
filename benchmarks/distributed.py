# ruff: noqa: I001  (the benchmarks import common first: it binds the fast BLAS before mlx loads)
"""Two local ranks (mlx.launch, ring backend, tensor parallel) against one process, on the same model.

    .venv/bin/python benchmarks/distributed.py [--model PATH]

The default model is a random-weight llama of about 25M parameters (8 layers, hidden 512, 8 heads, 4 KV
heads: the demo model's 9 heads do not split over 2 ranks). Prints the cost of the lockstep broadcast
alone (one all_sum per step when the kernel sent nothing), single-stream tokens/s and ms per token for
one process and for two ranks, and the aggregate tokens/s with 8 concurrent streams.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import best_of, concurrently, row  # first: binds the fast BLAS
from mlx_manager_nb.distributed.sharded import LAUNCH
from mlx_manager_nb.model_pool import Pool

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from tiny_model import build_tiny_model

MAX_TOKENS = 128
STREAMS = 8
PROMPTS = [f"Once upon a time there was a tiny model number {i} that could talk." for i in range(STREAMS)]
BROADCAST = """
import time, mlx.core as mx
from mlx_manager_nb.distributed.worker import share
g = mx.distributed.init(strict=True)
for _ in range(50): share(g, [])
t = time.perf_counter()
for _ in range(1000): share(g, [])
empty = (time.perf_counter() - t) / 1000
t = time.perf_counter()
for i in range(300): share(g, [{"op": "cancel", "id": str(i), "reason": "cancelled"}] if g.rank() == 0 else [])
one = (time.perf_counter() - t) / 300
if g.rank() == 0: print(f"{empty * 1e3:.4f} {one * 1e3:.4f}", flush=True)
"""


def broadcast_ms() -> tuple[float, float]:
    """Per step: the empty broadcast (one all_sum) and one carrying a command (two), in ms, on 2 local ranks."""
    with tempfile.NamedTemporaryFile("w", suffix=".py") as f:
        f.write(BROADCAST)
        f.flush()
        out = subprocess.run([sys.executable, "-c", LAUNCH, "-n", "2", "--backend", "ring", "--python",
                              sys.executable, f.name], capture_output=True, text=True, check=True).stdout
    empty, one = map(float, out.split()[-2:])
    return empty, one


def single(pool: Pool, model: str, no_eos: dict) -> float:
    r = pool.complete(PROMPTS[0], model=model, temperature=0, max_tokens=MAX_TOKENS, logit_bias=no_eos)
    return r.usage.completion_tokens / (r.duration - r.ttft)


def aggregate(pool: Pool, model: str, no_eos: dict) -> float:
    return concurrently(STREAMS, lambda i: pool.complete(PROMPTS[i], model=model, temperature=0, max_tokens=MAX_TOKENS,
                                                          logit_bias=no_eos).usage.completion_tokens)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a model folder whose heads split over 2 ranks (default: a random llama)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_tiny_model(Path(tmp) / "bench-llama", hidden_size=512, num_hidden_layers=8,
                                              intermediate_size=1408, num_attention_heads=8, num_key_value_heads=4)
        empty, one = broadcast_ms()
        print("Lockstep broadcast, 2 local ranks (ring over loopback TCP):")
        row("per step, nothing sent (1 all_sum)", empty, "ms")
        row("per step, one command (2 all_sums)", one, "ms")
        pool = Pool(keep_alive=None)
        local = pool.load(path).name
        started = time.perf_counter()
        sharded = pool.load(path, hosts=["127.0.0.1", "127.0.0.1"]).name
        print(f"Two ranks started and loaded in {time.perf_counter() - started:.1f} s")
        no_eos = {pool._runner(local).tokenizer.eos_token_id: -100}  # every request runs MAX_TOKENS
        one_tps = best_of(3, lambda: single(pool, local, no_eos))
        two_tps = best_of(3, lambda: single(pool, sharded, no_eos))
        print(f"Single stream, {MAX_TOKENS} tokens:")
        row("one process", one_tps, "tok/s")
        row("two ranks", two_tps, "tok/s", two_tps / one_tps)
        row("per-token overhead of two ranks", 1e3 / two_tps - 1e3 / one_tps, "ms")
        one_agg = best_of(2, lambda: aggregate(pool, local, no_eos))
        two_agg = best_of(2, lambda: aggregate(pool, sharded, no_eos))
        print(f"{STREAMS} concurrent streams, aggregate:")
        row("one process", one_agg, "tok/s")
        row("two ranks", two_agg, "tok/s", two_agg / one_agg)
        pool.close()


if __name__ == "__main__":
    main()
