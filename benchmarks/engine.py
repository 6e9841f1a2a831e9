# ruff: noqa: I001  (the benchmarks import common first: it binds the fast BLAS before mlx loads)
"""The engine against raw mlx-lm, in one run on the demo model (same float32 weights on both sides).

    .venv/bin/python benchmarks/engine.py

Prints raw ``mlx_lm.stream_generate`` tokens/s and time to first token, the pool's single stream,
raw ``batch_generate`` with 8 prompts, the pool with 8 concurrent consumers, and the ratios.
Targets: pool single stream >= 0.95 x raw; pool with 8 consumers >= 0.9 x raw batch of 8.
"""

import time

from common import MAX_TOKENS, best_of, concurrently, demo_path, messages, row  # first: binds the fast BLAS
import mlx.core as mx
from mlx_lm import batch_generate, stream_generate
from mlx_lm.sample_utils import make_sampler

from mlx_manager_nb.model_pool import Pool
from mlx_manager_nb.registry import _prepare_chat


def raw_single(model, tokenizer, prompt) -> tuple[float, float]:
    start = time.perf_counter()
    responses = stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS, sampler=make_sampler(0.0))
    next(responses)
    ttft = time.perf_counter() - start
    *_, last = responses
    return last.generation_tps, ttft


def main() -> None:
    path = demo_path()
    runner = _prepare_chat("raw", path, dequantize=mx.default_device().type == mx.DeviceType.cpu)()
    mx.eval(runner.model.parameters())
    model, tokenizer = runner.model, runner.tokenizer
    prompts = [tokenizer.apply_chat_template(messages(i), add_generation_prompt=True) for i in range(8)]
    print(f"demo model, {len(prompts[0])}-token prompt, {MAX_TOKENS} tokens out, device {mx.default_device()}")

    raw_tps = best_of(3, lambda: raw_single(model, tokenizer, prompts[0])[0])
    raw_ttft = best_of(3, lambda: raw_single(model, tokenizer, prompts[0])[1])

    def raw_batch() -> float:
        start = time.perf_counter()
        out = batch_generate(model, tokenizer, prompts, max_tokens=MAX_TOKENS, return_token_ids=True)
        return sum(len(t) for t in out.token_ids) / (time.perf_counter() - start)

    raw_batch_tps = best_of(2, raw_batch)


    pool = Pool(keep_alive=None)
    pool.load(path)

    def pool_single() -> tuple[float, float]:
        # a new prompt each time, so the prompt cache does not flatter the pool
        r = pool.chat(messages(int(time.time() * 1000) % 997 + 100), temperature=0, max_tokens=MAX_TOKENS)
        return r.tokens_per_second, r.ttft

    pool_tps = best_of(3, lambda: pool_single()[0])
    pool_ttft = best_of(3, lambda: pool_single()[1])

    def pool_batch() -> float:
        salt = int(time.time() * 1000) % 997 + 100
        return concurrently(8, lambda i: pool.chat(messages(salt + i), temperature=0,
                                                   max_tokens=MAX_TOKENS).usage.completion_tokens)

    pool_batch_tps = best_of(2, pool_batch)
    pool.close()

    print("single stream")
    row("raw mlx_lm.stream_generate", raw_tps, "tok/s")
    row("pool.chat", pool_tps, "tok/s", pool_tps / raw_tps, 0.95)
    row("raw time to first token", raw_ttft * 1000, "ms")
    row("pool time to first token", pool_ttft * 1000, "ms", raw_ttft / pool_ttft)
    print("8 at once (aggregate)")
    row("raw batch_generate, 8 prompts", raw_batch_tps, "tok/s")
    row("pool, 8 concurrent consumers", pool_batch_tps, "tok/s", pool_batch_tps / raw_batch_tps, 0.9)


if __name__ == "__main__":
    main()
