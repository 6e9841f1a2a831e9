"""Command line: ``python -m mlx_manager_nb serve --model demo --port 8000`` and ``... demo``."""

from __future__ import annotations

import argparse
import sys
import time


def serve_command(args: argparse.Namespace) -> int:
    import mlx_manager_nb
    from mlx_manager_nb.server import serve

    pool = mlx_manager_nb.pool
    for ref in args.model:
        info = pool.load(ref, progress=lambda stage, f: print(f"\r{ref}: {stage} {f:4.0%}", end="", flush=True))
        print(f"\r{ref}: loaded as {info.alias or info.name} ({info.size_bytes / 2**20:.0f} MiB)")
    server = serve(pool, host=args.host, port=args.port, api_key=args.api_key, cors_origins=args.cors,
                   mode="thread", allow_remote=args.allow_remote)
    print(f"Serving {', '.join(pool.health()['models']) or 'no model yet'} at {server.url}/v1 "
          f"(OpenAI and Anthropic protocols). Ctrl-C stops.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nStopping (open streams get 5 s to finish)...")
        server.stop(drain=5.0)
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
    s.add_argument("--api-key", default=None, help="require this key (Bearer or x-api-key)")
    s.add_argument("--cors", action="append", default=[], help="allowed browser origin (repeatable)")
    s.add_argument("--allow-remote", action="store_true", help="allow a non-loopback host without an API key")
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
