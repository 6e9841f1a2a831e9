"""No client can stall another: a bystander stream alone and beside each heavy load, in one run.

    .venv/bin/python benchmarks/fairness.py [--quick] [--only NAME]

The server runs in thread mode in this process over the demo models; the bystander (a streamed
40-token chat) and every load are separate client processes (benchmarks/load_clients.py), except
the model load, which is the notebook's own ``pool.load``. Each load starts once the bystander
streams, as a client arriving beside a running stream does, and runs until it ends. The bystander's
inter-token gaps (median, p99, max) and its total time are printed with two ratios to the quiet
run: max gap / quiet median gap (target <= 3) and total / quiet total (target <= 1.5).
``--quick`` shrinks every load (a smoke run, not a measurement); ``--only NAME`` runs the loads whose
label holds NAME. The image load sends one 512-pixel image to a vision model whose tower has
SmolVLM-256M's size (SigLIP-B/16: hidden 768, 12 layers, 12 heads; random weights built at run time
with tests/tiny_vlm.py, over its tiny text model): one tile, 64 image tokens.
"""

import base64
import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from common import demo_path  # first: binds the fast BLAS

from mlx_manager_nb.model_pool import Pool
from mlx_manager_nb.server import serve
from mlx_manager_nb.store import resolve

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from tiny_vlm import build_tiny_vlm

CLIENTS = str(Path(__file__).with_name("load_clients.py"))
BYSTANDER_TOKENS = 40
SENTENCE = "The keeper climbed the tower at dusk and lit the lamp while the storm gathered over the bay. "


def sizes(quick: bool) -> dict:
    if quick:
        return {"prompt": 1500, "texts": 128, "grammars": 3, "unread": 10, "schemas": 2, "halfopen": 200}
    return {"prompt": 6000, "texts": 512, "grammars": 10, "unread": 40, "schemas": 6, "halfopen": 2000}


def long_text(tokenizer, n: int) -> str:
    per = len(tokenizer.encode(SENTENCE * 10)) / 10
    return SENTENCE * int(n / per)


def chat(content: str, max_tokens: int, **extra) -> tuple[str, dict]:
    return "/v1/chat/completions", {"model": "demo", "max_tokens": max_tokens, "temperature": 0,
                                    "messages": [{"role": "user", "content": content}], **extra}


def image_chat() -> tuple[str, dict]:
    """A chat to the vision model holding a 512 x 512 PNG of noise (one tile on SigLIP-B/16)."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), np.uint8)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return "/v1/chat/completions", {"model": "vision", "max_tokens": 8, "temperature": 0, "messages": [{
        "role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                    {"type": "image_url", "image_url": {"url": url}}]}]}


def load_vision(pool: Pool, folder: Path) -> None:
    """A vision model with SmolVLM-256M's tower (SigLIP-B/16 at 512 pixels), random weights, as ``vision``."""
    build_tiny_vlm(folder, splitting=False, tile=512, patch=16, scale=4, hidden_size=768, num_hidden_layers=12,
                   num_attention_heads=12, intermediate_size=3072)
    pool.image_splitting = False
    pool.load(folder, alias="vision")


def loads(tokenizer, n: dict) -> dict:
    """Each load: (client kind, its argument: a list of requests or a count)."""
    grammar = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "^(x{500}){500}$"}}, "required": ["s"]}}}
    enum = [i if i % 3 == 0 else (f"v{i}" if i % 3 == 1 else i + 0.5) for i in range(7000)]
    schema = {"type": "json_schema", "json_schema": {"name": "e", "schema": {
        "$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
        "properties": {"v": {"enum": enum}}, "required": ["v"]}}}
    texts = [f"Document {i}: " + SENTENCE * 3 for i in range(n["texts"])]
    return {
        f"{n['prompt']:,}-token prompt": ("posts", [chat(long_text(tokenizer, n["prompt"]) + "Summarize.", 1)]),
        "a second model loading": ("load", None),
        f"{n['texts']}-string embedding batch": ("posts", [("/v1/embeddings", {"model": "demo-embed",
                                                                                "input": texts})]),
        f"{n['grammars']} expensive grammars": ("posts", [chat(f"Say x {i}", 40, response_format=grammar)
                                                          for i in range(n["grammars"])]),
        f"{n['unread']} unread streams": ("unread", [chat(f"Story {i}", 400, stream=True) for i in range(n["unread"])]),
        f"{n['schemas']} expensive schemas": ("posts", [chat(f"Pick {i}", 8, response_format=schema)
                                                        for i in range(n["schemas"])]),
        f"{n['halfopen']:,} half-open connections": ("halfopen", n["halfopen"]),
        "an image on a SigLIP-B tower": ("posts", [image_chat()]),
    }


@contextlib.contextmanager
def bystander(url: str) -> Iterator[dict]:
    """Start the bystander; the block runs once its first token arrived; the dict then holds its figures."""
    proc = subprocess.Popen([sys.executable, CLIENTS, "bystander", url, "demo", str(BYSTANDER_TOKENS)],
                            stdout=subprocess.PIPE, text=True)
    result: dict = {}
    try:
        proc.stdout.readline()  # "streaming"
        yield result
        run = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    gaps = sorted(b - a for a, b in zip(run["arrivals"], run["arrivals"][1:], strict=False))
    result.update(median=gaps[len(gaps) // 2], p99=gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))],
                  max=gaps[-1], total=run["total"], tokens=len(run["arrivals"]))


@contextlib.contextmanager
def load_client(url: str, kind: str, arg) -> Iterator[Callable[[], None]]:
    """A load client process, prepared; the block calls what it gets to send the load."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(arg, f)
    proc = subprocess.Popen([sys.executable, CLIENTS, kind, url, str(arg) if kind == "halfopen" else f.name],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()  # "ready"
        yield lambda: (proc.stdin.write("go\n"), proc.stdin.flush())
    finally:
        proc.kill()
        proc.wait()
        Path(f.name).unlink()


def beside(pool: Pool, url: str, kind: str, arg) -> dict:
    """The bystander's figures with a load arriving once it streams (``load``: the notebook loads demo-embed)."""
    if kind == "load":
        with contextlib.suppress(Exception):
            pool.unload("demo-embed")
        with bystander(url) as result:
            pool.load(resolve("demo-embed"), alias="demo-embed")
        return result
    with load_client(url, kind, arg) as go, bystander(url) as result:
        go()  # the load then runs until the bystander has finished
    return result


def settle(server) -> None:
    """Wait until the server has no request in flight (a killed load's requests end as cancelled)."""
    end = time.monotonic() + 120
    while server.stats()["in_flight"] and time.monotonic() < end:
        time.sleep(0.2)
    time.sleep(0.5)


def show(label: str, r: dict, quiet: dict | None) -> None:
    text = (f"  {label:34} {r['median'] * 1000:7.0f} {r['p99'] * 1000:7.0f} {r['max'] * 1000:8.0f} ms"
            f" {r['total']:7.1f} s")
    if quiet is not None:
        gap, total = r["max"] / quiet["median"], r["total"] / quiet["total"]
        text += (f"   max/quiet median {gap:6.1f}{'' if gap <= 3 else ' (target 3)':12}"
                 f" total/quiet {total:5.2f}{'' if total <= 1.5 else ' (target 1.5)'}")
    print(text, flush=True)


def main() -> None:
    quick = "--quick" in sys.argv
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
    pool = Pool(keep_alive=None)
    pool.load(demo_path(), alias="demo", pin=True)
    pool.load(resolve("demo-embed"), alias="demo-embed")
    server = serve(pool, port=0, mode="thread")
    tokenizer = pool.engine.runner(pool.models()[0].name).tokenizer
    print(f"demo model, a {BYSTANDER_TOKENS}-token streamed bystander; server at {server.url}")
    print(f"  {'load':34} {'median':>7} {'p99':>7} {'max gap':>8}    {'total':>7}")
    for _ in range(2):  # a warm-up, then the quiet run
        with bystander(server.url) as quiet:
            pass
    show("none (quiet)", quiet, None)
    chosen = {label: load for label, load in loads(tokenizer, sizes(quick)).items() if only in label}
    folder = tempfile.TemporaryDirectory()  # the vision model's random weights (350 MB)
    if any("image" in label for label in chosen):
        load_vision(pool, Path(folder.name) / "siglip-b-vlm")
    for label, (kind, arg) in chosen.items():
        show(label, beside(pool, server.url, kind, arg), quiet)
        settle(server)
    server.stop(drain=0)
    pool.close()
    folder.cleanup()


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)")
