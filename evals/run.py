"""Run the evaluation harnesses against this project's server serving the demo model: ``make evals``.

Starts ``python -m mlx_manager_nb serve --model demo`` (with an API key) in a scratch ``MLX_NB_HOME``
(the demo model linked from the demo cache, never the user's home), runs EleutherAI's ``lm-eval`` and
``inspect-ai`` from their own virtualenvs (``.venv-lmeval``, ``.venv-inspect``: their pins are not the
project's), lets them print their result tables, and stops the server. Their logs (each sample's prompt and
answer) are kept in evals/logs/: ``inspect view --log-dir evals/logs/inspect`` shows inspect-ai's.

``python evals/run.py lmeval`` or ``... inspect`` runs one harness. The tasks read evals/capitals.jsonl;
lm-eval's task folder is evals/lmeval.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlx_manager_nb.scratch import scratch_home
from mlx_manager_nb.store import resolve

ROOT = Path(__file__).resolve().parent.parent
LMEVAL = ROOT / ".venv-lmeval" / "bin" / "lm-eval"
INSPECT = ROOT / ".venv-inspect" / "bin" / "inspect"
LOGS = ROOT / "evals" / "logs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, key: str) -> subprocess.Popen:
    """The command-line server with the demo model, answering once /health does."""
    server = subprocess.Popen([sys.executable, "-m", "mlx_manager_nb", "serve", "--model", "demo", "--port", str(port)],
                              env={**os.environ, "MLX_NB_API_KEY": key})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited with status {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    sys.exit("the server did not answer /health within 300 s")


def lmeval_runs(base: str, tokenizer: Path) -> list[tuple[str, list[str]]]:
    """lm-eval's two API models: completions (multiple choice by loglikelihood, generation from token-id
    prompts) and chat completions (generation through the chat template)."""
    common = ["--include_path", "evals/lmeval", "--log_samples", "--output_path", str(LOGS / "lm-eval")]
    return [
        ("lm-eval local-completions", [
            str(LMEVAL), "run", "--model", "local-completions", "--tasks", "capitals_mc,capitals_gen",
            "--model_args", f"model=demo,base_url={base}/completions,tokenizer_backend=huggingface,"
                            f"tokenizer={tokenizer},num_concurrent=4,max_retries=1", *common]),
        ("lm-eval local-chat-completions", [
            str(LMEVAL), "run", "--model", "local-chat-completions", "--tasks", "capitals_chat",
            "--apply_chat_template", "--model_args", f"model=demo,base_url={base}/chat/completions,"
                                                     "num_concurrent=4,max_retries=1", *common]),
    ]


def inspect_runs() -> list[tuple[str, list[str]]]:
    """inspect-ai's OpenAI-compatible provider (service ``mlxnb``: MLXNB_BASE_URL, MLXNB_API_KEY) over chat
    completions, then over the Responses API, asking for token log-probabilities as well. Eight
    connections: left to adapt, inspect-ai raises its concurrency until the server's per-client limit
    (16 running) answers 429, then backs off."""
    cmd = [str(INSPECT), "eval", "evals/inspect_capitals.py", "--model", "openai-api/mlxnb/demo", "--temperature",
           "0", "--max-tokens", "16", "--logprobs", "--top-logprobs", "3", "--max-connections", "8",
           "--display", "plain", "--log-dir", str(LOGS / "inspect")]
    return [("inspect-ai openai-api (chat)", cmd),
            ("inspect-ai openai-api (responses)", [*cmd, "-M", "responses_api=true"])]


def main(which: list[str]) -> int:
    which = which or ["lmeval", "inspect"]
    missing = [str(p.parent.parent) for name, p in (("lmeval", LMEVAL), ("inspect", INSPECT))
               if name in which and not p.exists()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: `make evals` installs the harnesses")
    key = secrets.token_urlsafe(16)
    failed = 0
    with scratch_home(show_progress=True) as home:
        port = free_port()
        base = f"http://127.0.0.1:{port}/v1"
        server = start_server(port, key)
        env = {**os.environ, "OPENAI_API_KEY": key, "MLXNB_API_KEY": key, "MLXNB_BASE_URL": base,
               # lm-eval reads the JSONL through Hugging Face datasets: offline, cached in the scratch home
               "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "LMEVAL_LOG_LEVEL": "WARNING"}
        runs = ((lmeval_runs(base, resolve("demo")) if "lmeval" in which else [])
                + (inspect_runs() if "inspect" in which else []))
        timings = []
        try:
            for title, cmd in runs:
                print(f"\n=== {title} ===", flush=True)
                start = time.perf_counter()
                status = subprocess.run(cmd, cwd=ROOT, env=env).returncode
                timings.append((title, time.perf_counter() - start, status))
                failed += status != 0
        finally:
            server.terminate()  # SIGTERM: the serve command drains as on Ctrl-C
            server.wait(timeout=60)
        print("\n=== took ===")
        for title, seconds, status in timings:
            print(f"{title:32} {seconds:6.0f} s  {'ok' if status == 0 else f'FAILED (exit status {status})'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
