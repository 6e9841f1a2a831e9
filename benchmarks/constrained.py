
"""Constrained against free decoding on the demo model, in one run.

    .venv/bin/python benchmarks/constrained.py [max_tokens]

The constrained requests follow a JSON schema with one long string (``{"story": ...}``), so they
decode as many tokens as the free ones and the ratio is the per-token cost of the grammar (the mask
and the lost overlap of the next forward pass). Prints tokens/s for one stream and for 8 concurrent
streams, the free requests' tokens/s in a batch mixing 4 constrained and 4 free against an
all-free batch, and the compile time of a nested schema, first time and cached.
Targets: constrained overhead <= 10% (ratio >= 0.9); free requests in a mixed batch >= 0.95 x all-free.
"""

import statistics
import sys
import threading
import time

from common import MAX_TOKENS, best_of, concurrently, demo_path, messages, row  # first: binds the fast BLAS

from mlx_manager_nb import constraints
from mlx_manager_nb.model_pool import Pool

# minLength: the string never closes within max_tokens, so constrained rows run as long as free ones
STORY = {"type": "object", "properties": {"story": {"type": "string", "minLength": 10000}}, "required": ["story"]}
NESTED = {
    "type": "object",
    "properties": {
        "customer": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"},
                                                      "tier": {"enum": ["free", "pro", "team"]}},
                     "required": ["name", "tier"]},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "qty": {"type": "integer", "minimum": 1},
            "tags": {"type": "array", "items": {"enum": ["new", "sale", "gift"]}}}, "required": ["sku", "qty"]}},
        "status": {"enum": ["new", "paid", "shipped"]},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["customer", "items", "status"],
}


def medians(runs: int, fn) -> tuple[float, ...]:
    """The medians of each value fn() returns, over several runs (after a warm-up run)."""
    fn()
    return tuple(statistics.median(v) for v in zip(*(fn() for _ in range(runs)), strict=True))


def main() -> None:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else MAX_TOKENS
    pool = Pool(keep_alive=None)
    name = pool.load(demo_path()).name
    tokenizer = pool.engine.runner(name).tokenizer
    salt = [100]

    def chat(constrained: bool) -> float:
        salt[0] += 1  # a new prompt each time, so the prompt cache does not flatter either side
        kw = {"schema": STORY} if constrained else {}
        r = pool.chat(messages(salt[0]), temperature=0, max_tokens=tokens, **kw)
        return r.tokens_per_second

    start = time.perf_counter()
    constraints.ll_tokenizer(tokenizer)
    convert = time.perf_counter() - start
    start = time.perf_counter()
    constraints.compile_grammar(tokenizer, constraints.json_grammar(NESTED, "schema"), "schema")
    compile_first = time.perf_counter() - start
    start = time.perf_counter()
    constraints.compile_grammar(tokenizer, constraints.json_grammar(NESTED, "schema"), "schema")
    compile_cached = time.perf_counter() - start

    free_tps = best_of(2, lambda: chat(False))
    constrained_tps = best_of(2, lambda: chat(True))

    def batch(n_constrained: int, n_free: int) -> tuple[float, float]:
        """Aggregate tokens/s of the batch, and the median tokens/s of its free requests."""
        salt[0] += 8
        base = salt[0]
        free_rates: list[float] = []
        lock = threading.Lock()

        def one(i: int) -> int:
            kw = {"schema": STORY} if i < n_constrained else {}
            r = pool.chat(messages(base + i), temperature=0, max_tokens=tokens, **kw)
            if i >= n_constrained:
                with lock:
                    free_rates.append(r.tokens_per_second)
            return r.usage.completion_tokens

        aggregate = concurrently(n_constrained + n_free, one)
        return aggregate, statistics.median(free_rates) if free_rates else 0.0

    all_free, all_free_each = medians(2, lambda: batch(0, 8))
    all_constrained, _ = medians(2, lambda: batch(8, 0))
    _, mixed_free_each = medians(2, lambda: batch(4, 4))
    pool.close()

    print(f"demo model, {tokens} tokens out, schema {{story: string}} against free text")
    print("grammar")
    row("tokenizer conversion (once per model)", convert * 1000, "ms")
    row("nested schema compile, first", compile_first * 1000, "ms")
    row("nested schema compile, cached", compile_cached * 1000, "ms")
    print("single stream")
    row("free", free_tps, "tok/s")
    row("constrained", constrained_tps, "tok/s", constrained_tps / free_tps, 0.9)
    print("8 at once (aggregate)")
    row("8 free", all_free, "tok/s")
    row("8 constrained", all_constrained, "tok/s", all_constrained / all_free, 0.9)
    print("free requests' own tokens/s (median)")
    row("in a batch of 8 free", all_free_each, "tok/s")
    row("in a batch of 4 constrained + 4 free", mixed_free_each, "tok/s", mixed_free_each / all_free_each, 0.95)


if __name__ == "__main__":
    main()
