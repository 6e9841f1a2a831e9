"""Command line: ``python -m mlx_manager_nb serve --model demo --port 8000``, ``... pull ORG/NAME``,
``... convert MODEL --q-bits 4``, ``... demo`` and ``... lab``."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from mlx_manager_nb.server_options import add_serve_arguments, serve_options


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_command(args: argparse.Namespace) -> int:
    from mlx_manager_nb.defaults import default_pool
    from mlx_manager_nb.server import serve

    pool = default_pool()
    for ref in args.model:
        def progress(stage: str, fraction: float, ref: str = ref) -> None:
            print(f"\r{ref}: {stage} {fraction:4.0%}", end="", flush=True)

        info = pool.load(ref, progress=progress, kv_bits=args.kv_bits)
        print(f"\r{ref}: loaded as {info.alias or info.name} ({info.size_bytes / 2**20:.0f} MiB)")
    server = serve(pool, mode="thread", **serve_options(args))
    print(f"Serving {', '.join(pool.health()['models']) or 'no model yet'} (OpenAI and Anthropic protocols):\n"
          f"{server.describe()}\nCtrl-C stops.", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop: the same drain as Ctrl-C
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print(f"\nStopping: requests in flight get {args.drain:g} s to finish...", flush=True)
        server.stop(drain=args.drain)
    return 0


def pull_command(args: argparse.Namespace) -> int:
    from mlx_manager_nb import display, hub

    due = display.every(0.1)

    def progress(t: hub.Transfer) -> None:  # ten times a second, and at the end
        if due(t.done == t.total):
            print(f"\r{display.transfer(args.repo, t)['text/plain']}", end="", flush=True)

    try:
        path = hub.pull(args.repo, progress)
    except KeyboardInterrupt:
        print("\nStopped: the partial files are kept; run the same command again to continue.", file=sys.stderr)
        return 130
    print(f"\nPulled {args.repo} into {path}.")
    return 0


def convert_command(args: argparse.Namespace) -> int:
    from mlx_manager_nb import display
    from mlx_manager_nb.convert import convert

    due = display.every(0.1)

    def progress(stage: str, fraction: float) -> None:  # ten times a second, and at the end
        if due(fraction == 1.0):
            print(f"\r{display.progress(args.model, stage, fraction)['text/plain']}", end="", flush=True)

    try:
        path = convert(args.model, args.q_bits, args.name, progress)
    except KeyboardInterrupt:
        print("\nStopped: nothing was written to the store.", file=sys.stderr)
        return 130
    print(f"\nConverted {args.model} into {path}.")
    return 0


def demo_command(args: argparse.Namespace) -> int:
    from mlx_manager_nb.headless_demo import run

    return run(question=args.question)


def lab_command(args: argparse.Namespace) -> int:
    from mlx_manager_nb.lab import run

    run(Path(args.dir), args.jupyter_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_manager_nb", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("serve", help="serve models over the OpenAI and Anthropic protocols")
    s.add_argument("--model", action="append", default=[], help="model to load first (repeatable), e.g. demo")
    s.add_argument("--kv-bits", type=int, choices=(4, 8), default=None,
                   help="quantize the --model models' KV caches to 4 or 8 bits (see pool.load(kv_bits=...))")
    add_serve_arguments(s)
    s.add_argument("--drain", type=float, default=5.0, metavar="SECONDS",
                   help="at Ctrl-C or SIGTERM, how long requests in flight get to finish (default 5)")
    s.set_defaults(run=serve_command)
    p = commands.add_parser("pull", help="download a Hugging Face repo's MLX model into the store (resumable)")
    p.add_argument("repo", metavar="ORG/NAME")
    p.set_defaults(run=pull_command)
    c = commands.add_parser("convert", help="convert a Hugging Face safetensors model to MLX in the store")
    c.add_argument("model", metavar="MODEL", help="org/name (pulled first), or a local Hugging Face model folder")
    c.add_argument("--q-bits", type=int, choices=(4, 8), help="quantize to 4 or 8 bits (default: keep the dtype)")
    c.add_argument("--as", dest="name", metavar="NAME", help="the store name (default: the repo's name, -4bit...)")
    c.set_defaults(run=convert_command)
    d = commands.add_parser("demo", help="the notebook story, headless: a real kernel serving the demo model")
    d.add_argument("--question", default="What is the capital of France? Answer in one sentence.")
    d.set_defaults(run=demo_command)
    lab = commands.add_parser("lab", help="JupyterLab on working copies of the notebooks (the repository's stay "
                                         "as committed)")
    lab.add_argument("--dir", default="lab", help="the working folder (default: lab)")
    lab.set_defaults(run=lab_command)  # any other argument goes to JupyterLab, e.g. --port 8890
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "lab":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.jupyter_args = extra
    try:
        return args.run(args)
    except Exception as e:  # a readable line, not a traceback, for the errors users cause
        from mlx_manager_nb.errors import MLXManagerError

        if isinstance(e, MLXManagerError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
