"""The cost of log-probabilities in a batch: 8 concurrent greedy chats with ``top_logprobs=5``
against the same without, on the demo model (target: within 10% of the aggregate tokens/s).

Run from the repository root: ``.venv/bin/python benchmarks/logprobs.py [max_tokens]``.
"""

from __future__ import annotations

import sys

from common import MAX_TOKENS, best_of, concurrently, demo_path, messages, row  # first: binds the fast BLAS

from mlx_manager_nb.model_pool import Pool

CONCURRENT = 8


def main() -> None:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else MAX_TOKENS
    pool = Pool(keep_alive=None)
    pool.load(demo_path())
    salt = [100]

    def batch(**kw: object) -> float:
        salt[0] += CONCURRENT  # new prompts each time, so the prompt cache flatters neither side
        base = salt[0]

        def one(i: int) -> int:
            return pool.chat(messages(base + i), temperature=0, max_tokens=tokens, **kw).usage.completion_tokens

        return concurrently(CONCURRENT, one)

    plain = best_of(2, batch)
    with_logprobs = best_of(2, lambda: batch(logprobs=True, top_logprobs=5))
    pool.close()
    print(f"demo model, {CONCURRENT} concurrent greedy chats, {tokens} tokens out")
    row("without logprobs", plain, "tok/s")
    row("with logprobs, top_logprobs=5", with_logprobs, "tok/s", with_logprobs / plain, target=0.9)


if __name__ == "__main__":
    main()
