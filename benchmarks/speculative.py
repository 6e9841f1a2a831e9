# ruff: noqa: I001  (the benchmarks import common first: it binds the fast BLAS before mlx loads)
"""Speculative decoding against plain decoding and raw mlx-lm, in one run on the demo model.

    .venv/bin/python benchmarks/speculative.py           # prompt lookup
    .venv/bin/python benchmarks/speculative.py --draft   # a draft model

One stream, greedy: each task is run with ``speculative=False`` (plain decoding) and with the
default (prompt lookup), and the texts must be identical. Tasks: rewrite a ~400-token passage with
one change, extract fields from a document, continue code (input-grounded: the answer copies its
input), and free-form chat, greedy and sampled (temperature 0.8: its text repeats itself less, so
prompt lookup finds fewer matches; there it must cost nothing). Raw mlx-lm (``stream_generate``, the
same float32 weights, in this process) decodes the rewrite's prompt for reference. Then 8 concurrent
streams with speculation allowed and not (it never runs beside other streams: the same speed is expected).

``--draft``: the draft-model mode instead, ``pool.load(demo, draft=demo)``: the demo model is the
only offline one, so its draft is its own 4-bit copy as stored (a draft is loaded as it is, the model
dequantized to float32), against mlx-lm's ``stream_generate(draft_model=...)`` with the same pair.
Targets: input-grounded tasks >= 2x plain tokens/s with identical text, free chat >= 0.95x, 8
streams >= 0.95x.
"""

import sys
import time

from common import concurrently, demo_path, row  # first: binds the fast BLAS
from mlx_manager_nb.model_pool import Pool

PASSAGE = (
    "Anna Keller had kept the lighthouse on Gull Rock for eleven years. Every evening at dusk she climbed the "
    "hundred and twelve iron steps to the lamp room, trimmed the wick, polished the great lens with a soft cloth "
    "and wrote the weather in the logbook: wind from the north-east, sea moderate, visibility good. The island was "
    "small, a hump of grey granite with a single stunted pine, a vegetable garden walled against the salt wind, and "
    "a jetty where the supply boat tied up on the first Monday of every month. Anna liked the quiet. She liked the "
    "way the beam swept the dark water, and the way the seals hauled out on the flat rocks below the cottage in the "
    "afternoons. In winter the storms came in from the open ocean, and the whole tower hummed like a struck bell. "
    "On one such night, after the worst of the gale had passed, Anna walked down to the shingle beach with a lamp "
    "to check the boat. Among the kelp and the broken crates she found a green glass bottle, its neck sealed with "
    "red wax. Inside was a folded sheet of heavy paper. She carried it back to the kitchen, dried her hands by the "
    "stove and broke the seal. The paper was a map, drawn in brown ink, of an island she did not recognise: a long "
    "bay on its western side, three hills, a river and, near the northern cape, a small cross beside the words "
    "under the third stone. Anna sat for a long time looking at it while the kettle sang. Then she took down the "
    "chart of the coast from the shelf above the table and began, very slowly, to compare the two."
)
DOCUMENT = (
    "INVOICE No. 2024-0387\nDate: 14 March 2024\nFrom: Harbour Supplies Ltd, 12 Quay Street, Portlow, PL4 9QT\n"
    "To: Gull Rock Lighthouse, attention Anna Keller\n\nItems:\n- 40 litres lamp oil at 3.20 per litre: 128.00\n"
    "- 2 replacement wicks at 4.50 each: 9.00\n- 1 brass polish, large tin: 6.75\n- 12 candles, beeswax: 18.00\n"
    "Subtotal: 161.75\nVAT (20%): 32.35\nTotal due: 194.10\nPayment terms: 30 days from the invoice date.\n"
    "Bank: Coastal Bank, account 4471 2290, sort code 30-91-42.\n"
)
CODE = '''def area_of_square(side):
    """Return the area of a square with the given side."""
    return side * side


def area_of_rectangle(width, height):
    """Return the area of a rectangle with the given width and height."""
    return width * height


def perimeter_of_square(side):
    """Return the perimeter of a square with the given side."""
    return 4 * side


def perimeter_of_rectangle(width, height):
    """Return the perimeter of a rectangle with the given width and height."""
'''
TASKS = {
    "rewrite ~400 tokens, one change": dict(messages=[{"role": "user", "content": (
        "Copy the following passage exactly, word for word, but call the keeper Maria instead of Anna. Output only "
        "the passage.\n\n" + PASSAGE)}], max_tokens=400),
    "extract fields from an invoice": dict(messages=[{"role": "user", "content": (
        DOCUMENT + "\nCopy every line of this invoice that states an amount of money, exactly as written, one per "
        "line.")}], max_tokens=160),
    "continue code": dict(prompt=CODE, max_tokens=200),
}
CHAT = dict(messages=[{"role": "user", "content": "Write a long, vivid story about a lighthouse keeper who finds a "
                       "mysterious map in a bottle. Describe the island, the storm and the treasure in detail."}],
            max_tokens=200)


def run(pool: Pool, task: dict, **params) -> tuple[str, float]:
    """The task's text (greedy unless ``params`` say) and its decoding speed (tokens after the first, per
    second), best of two."""
    params = {"temperature": 0, "max_tokens": task["max_tokens"], **params}
    if "prompt" in task:
        results = [pool.complete(task["prompt"], **params) for _ in range(2)]
    else:
        results = [pool.chat(task["messages"], **params) for _ in range(2)]
    return results[-1].text, max(r.tokens_per_second or 0.0 for r in results)


def float32(path):
    """The demo model and tokenizer as the pool holds them on CPUs: dequantized, float32."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.utils import dequantize_model

    model, tok = load(str(path))
    model = dequantize_model(model)
    model.set_dtype(mx.float32)
    return model, tok


def raw_mlx_lm(path, task: dict, draft=None) -> float:
    """Raw mlx-lm's decoding speed on the task's prompt (its own figure, generation_tps), float32 weights."""
    from mlx_lm import stream_generate

    model, tok = float32(path)
    ids = (tok.apply_chat_template(task["messages"], add_generation_prompt=True) if "messages" in task
           else tok.encode(task["prompt"]))
    best = 0.0
    for _ in range(2):
        *_, last = stream_generate(model, tok, ids, max_tokens=task["max_tokens"], draft_model=draft)
        best = max(best, last.generation_tps)
    return best


def compare(pool: Pool, label: str, task: dict, mode: str, target: float | None = None, **params) -> None:
    """Print the task's speed without speculation and with it, and whether the texts are the same (greedy)."""
    runner = pool.engine.runner(pool.find(None).name)
    plain_text, plain = run(pool, task, speculative=False, **params)
    drafted, accepted = runner.drafted, runner.accepted
    text, fast = run(pool, task, **params)
    same = "sampled" if params.get("temperature") else "identical" if text == plain_text else "DIFFERENT TEXT"
    print(f"{label} ({len(text)} chars, {same}; drafted {runner.drafted - drafted}, "
          f"accepted {runner.accepted - accepted})")
    row("plain decoding", plain, "tok/s")
    row(mode, fast, "tok/s", fast / plain, target)


def main() -> None:
    path = demo_path()
    if "--draft" in sys.argv:
        draft_mode(path)
        return
    with open("/proc/loadavg") as f:
        print(f"demo model (float32), greedy, one stream; load average before: {f.read().split()[0]}")
    pool = Pool(keep_alive=None)
    pool.load(path)
    pool.chat(CHAT["messages"], temperature=0, max_tokens=8)
    for label, task in [*TASKS.items(), ("free-form chat", CHAT)]:
        compare(pool, label, task, "prompt lookup", 0.95 if task is CHAT else 2.0)
    compare(pool, "free-form chat, sampled (temperature 0.8)", CHAT, "prompt lookup", 0.95, temperature=0.8)
    raw = raw_mlx_lm(path, next(iter(TASKS.values())))
    row("raw mlx-lm, rewrite prompt (plain)", raw, "tok/s")
    print("8 concurrent streams, free-form chat (aggregate)")

    def streams(**params) -> float:
        return concurrently(8, lambda i: pool.chat([{"role": "user", "content": CHAT["messages"][0]["content"]
                                                     + f" (Variation {i}.)"}], temperature=0, max_tokens=64,
                                                   **params).usage.completion_tokens)

    streams()
    plain8 = max(streams(speculative=False) for _ in range(2))
    spec8 = max(streams() for _ in range(2))
    row("speculative=False", plain8, "tok/s")
    row("speculation allowed", spec8, "tok/s", spec8 / plain8, 0.95)
    pool.close()


def draft_mode(path) -> None:
    from mlx_lm import load

    with open("/proc/loadavg") as f:
        print(f"draft model: the demo model's 4-bit copy drafts for its float32 self; load average before: "
              f"{f.read().split()[0]}")
    pool = Pool(keep_alive=None)
    start = time.perf_counter()
    pool.load(path, draft=path)
    print(f"  loaded with its draft in {time.perf_counter() - start:.1f} s")
    for label, task in [*TASKS.items(), ("free-form chat", CHAT)]:
        compare(pool, label, task, "draft model")
    pool.close()
    task = next(iter(TASKS.values()))
    row("raw mlx-lm, rewrite, plain", raw_mlx_lm(path, task), "tok/s")
    row("raw mlx-lm, rewrite, the same draft", raw_mlx_lm(path, task, load(str(path))[0]), "tok/s")


if __name__ == "__main__":
    main()
