"""The serving notebook's story, headless: a real Jupyter kernel loads the demo model and serves it on
its own event loop, while this process calls it with the official ``openai`` and ``anthropic`` SDKs.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _cell(client, code: str) -> str:
    """Run code in the kernel; return what it printed, failing loudly on an error."""
    out: list[str] = []

    def hook(msg: dict) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            out.append(content["text"])
        elif kind == "error":
            out.append("\n".join(content["traceback"]))

    reply = client.execute_interactive(code, output_hook=hook, timeout=900)
    if reply["content"]["status"] != "ok":
        raise RuntimeError("kernel cell failed:\n" + "".join(out))
    return "".join(out)


def _serve_and_call(question: str) -> int:
    import anthropic
    import openai
    from jupyter_client.manager import KernelManager

    print("Starting a Jupyter kernel...", flush=True)
    # IPC sockets in a private folder: local only, and the kernel does not warn about plain TCP
    sockets = tempfile.TemporaryDirectory(prefix="mlx-nb-demo-")
    km = KernelManager(kernel_name="python3", transport="ipc", ip=str(Path(sockets.name) / "kernel"))
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    try:
        print(_cell(kc, "%load_ext mlx_manager_nb"), end="")
        print("Loading the demo model in the kernel (fetched once, then offline)...", flush=True)
        _cell(kc, "from mlx_manager_nb import pool, audit\nfrom mlx_manager_nb.server import serve\n"
                  "from mlx_manager_nb.audit_log import utc_now\n"
                  "info = pool.load('demo', alias='demo')\nserver = serve(pool, port=0)\nstart = utc_now()")
        url = _cell(kc, "print(server.url)").strip()
        print(f"The kernel serves at {url} on its own event loop; this process is its client.\n")
        messages: Any = [{"role": "user", "content": question}]

        oa = openai.OpenAI(base_url=url + "/v1", api_key="not-needed")
        t = time.perf_counter()
        r = oa.chat.completions.create(model="demo", messages=messages, temperature=0, max_tokens=60)
        seconds = time.perf_counter() - t
        answer = (r.choices[0].message.content or "").strip()
        print(f"openai SDK      > {question}\n                  {answer}")
        print(f"                  ({r.usage.completion_tokens if r.usage else 0} tokens in {seconds:.1f} s)\n")

        an = anthropic.Anthropic(base_url=url, api_key="not-needed")
        print("anthropic SDK   > (streamed) Write a haiku about the sea.\n                  ", end="", flush=True)
        with an.messages.stream(model="demo", max_tokens=60, messages=[
                {"role": "user", "content": "Write a haiku about the sea."}], extra_body={"temperature": 0}) as stream:
            for text in stream.text_stream:
                print(text.replace("\n", "\n                  "), end="", flush=True)
            final = stream.get_final_message()
        print(f"\n                  ({final.usage.output_tokens} tokens, stop: {final.stop_reason})\n")

        print("The kernel still runs cells while it serves:", _cell(kc, "print(6 * 7)").strip())
        rows = json.loads(_cell(kc, "import json\naudit.flush()\n"
                                    "print(json.dumps(audit.query(source='http', since=start)))"))
        print("\nAudit rows the kernel recorded for these calls (newest first):")
        print(f"  {'endpoint':22} {'protocol':9} {'stream':6} {'status':8} {'tokens':>6} {'ttft s':>7} {'tok/s':>6}")
        for row in rows:
            print(f"  {row['endpoint']:22} {row['protocol']:9} {bool(row['stream'])!s:6} {row['status']:8} "
                  f"{row['completion_tokens'] or 0:>6} {row['ttft'] or 0:>7.2f} {row['tokens_per_second'] or 0:>6.1f}")
        _cell(kc, "await server.astop(drain=1)")
        print("\nServer stopped; the kernel shuts down.")
        return 0
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        sockets.cleanup()


def run(question: str) -> int:
    """The story in a scratch ``MLX_NB_HOME`` (the kernel inherits it): the user's own store and audit log
    are left untouched; the demo model is fetched and imported once into the demo cache."""
    from .scratch import scratch_home

    with scratch_home(show_progress=True):
        return _serve_and_call(question)


if __name__ == "__main__":
    sys.exit(run("What is the capital of France? Answer in one sentence."))
