"""Quantized KV (``kv_bits``) on the demo model: the quality cost, the memory and the disk bytes.

    .venv/bin/python benchmarks/kv_bits.py [--prompts 24] [--tokens 48]

For full precision, ``kv_bits=8`` and ``kv_bits=4``: greedy answers to N prompts (questions alone, and
questions about a 1,500-token document, where the KV matters most), compared with full precision's:
the share of identical answers and the mean share of an answer's tokens before the first difference;
then, for a 4,000-token prompt, the prompt cache's bytes per token in memory (what the KV budget counts),
its file's bytes per 1,000 tokens on disk, and its time to first token.
"""

import argparse
import time

from common import demo_path, row  # first: binds the fast BLAS

from mlx_manager_nb.model_pool import Pool
from mlx_manager_nb.store import home

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "How many legs does a spider have?",
             "Write a haiku about the sea.", "Explain photosynthesis in two sentences.", "What is 17 times 3?",
             "Give a synonym for 'happy'.", "Who wrote Romeo and Juliet?", "What does a compiler do?",
             "List the planets of the solar system.", "Why is the sky blue?", "Translate 'good morning' into French.",
             "What is the boiling point of water?", "Describe a cat in one sentence.", "What is a prime number?",
             "Suggest a name for a bakery."]
WORDS = ["harbor", "lantern", "tide", "ledger", "orchard", "copper", "meadow", "signal", "granite", "voyage"]


def document(tokenizer, tokens: int) -> str:
    return tokenizer.decode(tokenizer.encode(" ".join(WORDS[i % 7 * i % 10] for i in range(tokens * 2)))[:tokens])


def prompts(tokenizer, n: int) -> list[list[dict]]:
    doc = document(tokenizer, 1500)
    about = [[{"role": "system", "content": doc}, {"role": "user", "content": f"Which word comes after the {k}th "
                                                                              f"'tide'? Answer briefly."}]
             for k in range(1, 1 + n // 4)]
    alone = [[{"role": "user", "content": q}] for q in (QUESTIONS * 4)[: n - len(about)]]
    return alone + about


def run(bits: int | None, asks: list[list[dict]], max_tokens: int) -> tuple[list[str], float, float, float]:
    """The greedy answers; a 4,000-token prompt's memory bytes per token, disk bytes per 1,000 tokens and TTFT."""
    pool = Pool(keep_alive=None)
    info = pool.load(demo_path(), kv_bits=bits)
    answers = [pool.chat(m, temperature=0, max_tokens=max_tokens).text for m in asks]
    runner = pool.runner(info.name)
    before = pool.models()[0].cache_bytes
    doc = document(runner.tokenizer, 4000)
    started = time.perf_counter()
    long = pool.complete(doc, temperature=0, max_tokens=1)
    ttft = long.ttft or time.perf_counter() - started
    memory = (pool.models()[0].cache_bytes - before) / long.usage.prompt_tokens
    pool.close()  # its files written
    folder = home() / "kv"
    newest = max(folder.glob("*/*.safetensors"), key=lambda f: f.stat().st_mtime)
    disk = newest.stat().st_size / ((long.usage.prompt_tokens + 1) / 1000)
    return answers, memory, disk, ttft


def agreement(tokenizer, reference: list[str], answers: list[str]) -> tuple[float, float]:
    """The share of identical answers, and the mean share of each reference answer's tokens before the first
    difference."""
    same = sum(a == r for a, r in zip(answers, reference, strict=True)) / len(reference)
    shares = []
    for a, r in zip(answers, reference, strict=True):
        ta, tr = tokenizer.encode(a), tokenizer.encode(r)
        common = next((i for i, (x, y) in enumerate(zip(ta, tr, strict=False)) if x != y), min(len(ta), len(tr)))
        shares.append(common / max(len(tr), 1))
    return same, sum(shares) / len(shares)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()
    probe = Pool(keep_alive=None)
    tokenizer = probe.runner(probe.load(demo_path()).name).tokenizer
    probe.close()
    asks = prompts(tokenizer, args.prompts)
    results = {bits: run(bits, asks, args.tokens) for bits in (None, 8, 4)}
    reference, full_memory, full_disk, full_ttft = results[None]
    print(f"demo model, greedy, {len(asks)} prompts ({args.prompts // 4} about a 1,500-token document), "
          f"{args.tokens} tokens each; a 4,000-token prompt for the bytes")
    for bits, (answers, memory, disk, ttft) in results.items():
        name = "full precision" if bits is None else f"kv_bits={bits}"
        if bits is not None:
            same, prefix = agreement(tokenizer, reference, answers)
            row(f"{name}: identical greedy answers", same * 100, "%")
            row(f"{name}: answer tokens before a difference", prefix * 100, "%")
        row(f"{name}: KV bytes per token (memory)", memory, "B", full_memory / memory)
        row(f"{name}: disk bytes per 1,000 tokens", disk / 2**20, "MiB", full_disk / disk)
        row(f"{name}: time to first token, 4,000 tokens", ttft * 1000, "ms", full_ttft / ttft)


if __name__ == "__main__":
    main()
