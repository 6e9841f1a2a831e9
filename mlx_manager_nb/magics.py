"""IPython magics: ``%mlx`` manages models, the HTTP server and the audit log; ``%%chat`` talks to a model.

    %load_ext mlx_manager_nb
    %mlx load demo
    %%chat -t 0
    What is the capital of {country}?

    %%chat --schema City          # City: a pydantic class (or a JSON schema dict) in the notebook
    Describe Paris.

    %%chat --tools get_weather    # Python functions the model may call; they run, and it answers
    Weather in Paris?

Errors a user can cause (unknown model, bad option, busy port...) print one line, never a traceback.
Both magics work on the package's default ``pool`` and ``audit`` log.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from . import defaults, hub, kv_disk, store
from . import display as out
from .errors import MLXManagerError, ModelNotFoundError, ServerError
from .server_options import add_serve_arguments

if TYPE_CHECKING:
    from .audit_log import AuditLog
    from .model_pool import ModelInfo, Pool

META = {"source": "magic", "endpoint": "%%chat", "protocol": "python", "stream": True}
HINT = "See `%mlx ls` for local models, or start with `%mlx load demo`."
FORMATS = ("markdown", "text", "code", "json")
FENCE = re.compile(r"```[^\n`]*\n(.*?)(?:```|\Z)", re.S)


class UsageError(Exception):
    """A bad magic command line, shown as one line."""


class Interrupted(KeyboardInterrupt):
    """A ``%%chat`` stopped by a kernel interrupt; IPython shows it as one line."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


class _Exit(Exception):
    """argparse finished (after ``--help``) and wants to exit."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of exiting the kernel."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}. See `{self.prog} --help`.")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _Exit


def parse(parser: argparse.ArgumentParser, line: str) -> argparse.Namespace | None:
    """Parse a magic's line; None when ``--help`` was printed."""
    try:
        words = shlex.split(line)
    except ValueError as e:  # an unclosed quote
        parser.error(str(e))
    try:
        return parser.parse_args(words)
    except _Exit:
        return None


def _pool() -> Pool:
    return defaults.default_pool()


def _audit() -> AuditLog:
    return defaults.default_audit()


def banner() -> str:
    """The line ``%load_ext`` prints: version, device, models loaded and how to start."""
    import mlx.core as mx

    from . import __version__

    device = "GPU" if mx.default_device().type == mx.gpu else "CPU"
    pool = defaults.existing_pool()
    n = sum(m.state == "ready" for m in pool.models()) if pool is not None else 0
    return (f"mlx_manager_nb {__version__} · {device} · {n} model{'' if n == 1 else 's'} loaded · "
            f"start with `%mlx load demo`, then `%%chat`; `%mlx --help` lists the commands")


# -- %mlx commands ------------------------------------------------------------------------------


def keep_alive(text: str) -> float | str | None:
    """``--keep-alive``: seconds, ``forever`` (None) or ``default`` (the pool's)."""
    if text in ("default", "forever"):
        return None if text == "forever" else text
    seconds = float(text)
    if seconds < 0:
        raise ValueError(text)
    return seconds


def _with_progress(shell: Any, label: str, fn: Callable[[Callable[[str, float], None]], Any]) -> tuple[Any, out.Live]:
    """Run ``fn(progress)`` showing a progress bar; return its result and the bar, to be replaced."""
    live = out.Live(out.can_update(shell))
    try:
        return fn(lambda stage, fraction: live.update(out.progress(label, stage, fraction))), live
    except BaseException:
        live.update({}, final=True)
        raise


def cmd_load(magics: MLXMagics, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()] if args.hosts else None
    info, live = _with_progress(magics.shell, args.model, lambda progress: _pool().load(
        args.model, alias=args.alias, pin=args.pin, keep_alive=args.keep_alive, progress=progress,
        hosts=hosts, backend=args.backend, parallel=args.parallel, hostfile=args.hostfile, kv_bits=args.kv_bits))
    name = info.name + (f" as {info.alias!r}" if info.alias else "")
    details = (f"{_memory(info)}, context {info.context_length or '?'}" + (", pinned" if info.pinned else "")
               + (f", KV in {info.kv_bits} bits" if info.kv_bits else ""))
    if info.hosts:
        details += f", {args.parallel}-parallel over {len(info.hosts)} ranks ({', '.join(info.hosts)})"
    hint = "Embed with `pool.embed(texts)`." if info.kind == "embedding" else "Chat with `%%chat`."
    live.update({"text/plain": f"Loaded {name} ({details}) in {out.seconds(time.perf_counter() - started)}. "
                               f"{hint}"}, final=True)


def _memory(info: ModelInfo) -> str:
    """What a loaded model takes, and what it took on disk where that differs (quantized weights
    loaded as float32, MLX's fast path on a CPU): "513.1 MiB as float32 on CPU, 93.9 MiB on disk"."""
    if info.path is None or info.kind == "embedding" or info.placement != "local":
        return out.size(info.size_bytes)
    import mlx.core as mx

    stored = store.describe(info.path)
    quantized = stored.quantization.endswith("-bit") or stored.quantization == "quantized"
    if not quantized or info.size_bytes <= stored.size_bytes:
        return out.size(info.size_bytes)
    device = " on CPU" if mx.default_device().type == mx.DeviceType.cpu else ""
    return (f"{out.size(info.size_bytes)} as float32{device}, {out.size(stored.size_bytes)} on disk as "
            f"{stored.quantization}")


def cmd_warm(magics: MLXMagics, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    try:
        text = Path(args.file).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--file: cannot read {args.file}: {e}") from None
    prompt = text if args.raw else [{"role": "system", "content": text}]
    result, live = _with_progress(magics.shell, args.file,
                                  lambda progress: _pool().warm(args.model, prompt, progress=progress))
    live.update({}, final=True)  # the bar goes; the summary stays
    print(f"Kept the KV cache of {result.usage.prompt_tokens} tokens of {args.file} on {result.model} "
          f"(in memory and on disk) in {out.seconds(time.perf_counter() - started)}: a prompt that starts with it "
          f"skips that prefill{'' if args.raw else ' (`%%chat --system`, a client system prompt)'}.")


def cmd_attach(magics: MLXMagics, args: argparse.Namespace) -> None:
    info = _pool().attach(args.name, args.base_url, api_key=args.api_key, model=args.model)
    print(f"Attached {info.name} ({args.base_url}). Chat with `%%chat --model {info.name}`.")


def cmd_unload(magics: MLXMagics, args: argparse.Namespace) -> None:
    _pool().unload(args.name)
    print(f"Unloaded {args.name}.")


def cmd_pin(magics: MLXMagics, args: argparse.Namespace) -> None:
    _pool().pin(args.name)
    print(f"Pinned {args.name}: it stays loaded until `%mlx unpin {args.name}`.")


def cmd_unpin(magics: MLXMagics, args: argparse.Namespace) -> None:
    info = _pool().unpin(args.name)
    print(f"Unpinned {args.name}: it unloads after {out.seconds(info.keep_alive)} idle, or when room is needed.")


def cmd_ls(magics: MLXMagics, args: argparse.Namespace) -> None:
    models = store.list_local_models()
    if not models:
        print(f"No local models in {store.models_dir()} or the Hugging Face cache. "
              f"Try `%mlx load demo`, `%mlx pull ORG/NAME` or `%mlx import-gguf PATH`.")
        return
    rows = [[x.name, x.architecture, out.size(x.size_bytes), x.quantization, x.context_length,
             "yes" if x.has_chat_template else "no", x.origin, x.path.resolve()] for x in models]
    out.show(out.table(rows, ["name", "architecture", "on disk", "quantization", "context", "chat template",
                              "origin", "where"]))


def cmd_search(magics: MLXMagics, args: argparse.Namespace) -> None:
    found = hub.search(args.query, author=args.author, limit=args.limit, max_memory=_pool().max_memory)
    if not found:
        print(f"Nothing on the hub matches {args.query!r}" + (f" by {args.author}." if args.author else "."))
        return
    rows = [[m.repo, f"{m.parameters / 1e9:.2f} B" if m.parameters else None, m.quantization, out.size(m.size_bytes),
             m.downloads, m.likes, m.last_modified.date() if m.last_modified else None,
             None if m.fits is None else "yes" if m.fits else "no"] for m in found]
    out.show(out.table(rows, ["repo", "parameters", "quantization", "size", "downloads", "likes", "modified",
                              "fits max_memory"]))
    out.show(out.note(f"`%mlx pull {found[0].repo}` fetches one into the store."))


def cmd_pull(magics: MLXMagics, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    live = out.Live(out.can_update(magics.shell))
    try:
        path = hub.pull(args.repo, lambda t: live.update(out.transfer(args.repo, t)))
    except KeyboardInterrupt:
        live.update({}, final=True)
        raise Interrupted(f"the pull of {args.repo} stopped; its partial files are kept, and "
                          f"`%mlx pull {args.repo}` continues it.") from None
    except BaseException:
        live.update({}, final=True)
        raise
    live.update({"text/plain": f"Pulled {args.repo} ({out.size(store.disk_size(path))}) into {path} in "
                               f"{out.seconds(time.perf_counter() - started)}. Load it with "
                               f"`%mlx load {args.repo}`."}, final=True)


def cmd_rm(magics: MLXMagics, args: argparse.Namespace) -> None:
    model = store.find_local(args.name)
    where = model.path.resolve()
    loaded = {m.name: m.path for m in _pool().models() if m.path is not None}
    store.check_removable(model, loaded)
    what = f"{args.name} ({out.size(store.disk_size(model.path))}, {model.origin}: {where})"
    if not args.yes:
        print(f"This would remove {what}. Run `%mlx rm {args.name} --yes` to remove it.")
        return
    linked = model.path.is_symlink()
    removed = store.remove(model, loaded)
    print(f"Removed {what}" + (f": only the link {removed}, not the folder it points to." if linked else "."))


def cmd_du(magics: MLXMagics, args: argparse.Namespace) -> None:
    import shutil

    totals: dict[str, int] = {}
    for m in store.list_local_models():
        totals[m.origin] = totals.get(m.origin, 0) + store.disk_size(m.path)
    partial = hub.partials_dir()
    if partial.is_dir():
        totals["partial pulls"] = store.disk_size(partial)
    if kv_disk.root().is_dir():
        totals["prompt cache"] = store.disk_size(kv_disk.root())
    rows = [[origin, out.size(n)] for origin, n in totals.items()] + [["total", out.size(sum(totals.values()))]]
    out.show(out.table(rows, ["where", "on disk"]))
    base = store.models_dir() if store.models_dir().is_dir() else store.home().parent
    out.show(out.note(f"{out.size(shutil.disk_usage(base).free)} free on the disk holding {store.models_dir()}."))


def cmd_ps(magics: MLXMagics, args: argparse.Namespace) -> None:
    pool = _pool()
    models = pool.models()
    if not models:
        print("No model is loaded. Try `%mlx load demo`.")
        return
    rows = [[x.name + (" (default)" if pool.default is not None and pool.default in (x.name, x.alias) else ""),
             x.alias, x.kind, x.state,
             "this kernel" if x.placement == "local" else f"{x.placement}: {', '.join(x.hosts)}",
             out.size(x.size_bytes), x.in_flight, out.ago(x.last_used), "client" if x.auto_loaded else "user",
             "yes" if x.pinned else "no", out.seconds(x.keep_alive),
             out.size(x.cache_bytes) if x.cache_bytes else "",
             f"{out.size(x.disk_cache_bytes)}, {x.disk_hits} hits" if x.disk_cache_bytes else "",
             out.hit_rate(x)] for x in models]
    out.show(out.table(rows, ["name", "alias", "kind", "state", "runs on", "size", "in flight", "last used",
                              "loaded by", "pinned", "keep-alive", "cache in memory", "cache on disk", "hit rate"]))


def cmd_default(magics: MLXMagics, args: argparse.Namespace) -> None:
    pool = _pool()
    if args.model is not None:
        info = pool.find(args.model)
        pool.default = info.alias or info.name
    print(f"`%%chat` uses {pool.default or 'the most recently used model'} when no model is named.")


def cmd_import_gguf(magics: MLXMagics, args: argparse.Namespace) -> None:
    path, live = _with_progress(magics.shell, args.path,
                                lambda progress: store.import_gguf(args.path, args.name, progress))
    live.update({"text/plain": f"Imported {args.path} into the store as {path.name}. "
                               f"Load it with `%mlx load {path.name}`."}, final=True)


def cmd_convert(magics: MLXMagics, args: argparse.Namespace) -> None:
    from .convert import convert

    path, live = _with_progress(magics.shell, args.model,
                                lambda progress: convert(args.model, args.q_bits, args.name, progress, _pool()))
    model = store.describe(path)
    live.update({"text/plain": f"Converted {args.model} into the store as {path.name} ({out.size(model.size_bytes)}, "
                               f"{model.quantization}). Load it with `%mlx load {path.name}`."}, final=True)


def cmd_serve(magics: MLXMagics, args: argparse.Namespace) -> None:
    from .server import running_servers, serve
    from .server_options import serve_options

    if running := running_servers(_pool()):
        raise ServerError(f"A server is already running at {running[0].url}: `%mlx stop` it first.")
    server = serve(pool=_pool(), audit=_audit(), mode="thread" if args.thread else None, **serve_options(args))
    print(f"Serving at {server.url} (OpenAI and Anthropic protocols); `%mlx status` shows it, `%mlx stop` stops it.")
    print(server.describe())


def cmd_stop(magics: MLXMagics, args: argparse.Namespace) -> None:
    from .server import running_servers

    servers = running_servers(_pool())
    if not servers:
        raise ServerError("No server is running. Start one with `%mlx serve`.")
    for server in servers:
        pending = server.stop(drain=5.0)  # kernel mode: a task on this loop, done after the cell
        print(f"The server at {server.url} " + ("stopped." if pending is None else
                                                "is stopping: open streams get 5 s to finish."))


def cmd_status(magics: MLXMagics, args: argparse.Namespace) -> None:
    from .server import running_servers

    pool, audit = _pool(), _audit()
    health = pool.health()
    rows: list[list[Any]] = []
    for server in running_servers(pool):
        stats = server.stats()
        rows += [["server", f"{server.url} ({server.mode} mode)"], ["requests", stats["requests"]],
                 ["active streams", stats["active_streams"]], ["tokens/s", f"{stats['tokens_per_second']:.1f}"]]
    if not rows:
        rows.append(["server", "not running (`%mlx serve` starts it)"])
    engine = health["engine"] + (f" ({health['engine_error']})" if health.get("engine_error") else "")
    rows += [["engine", engine], ["models", ", ".join(health["models"]) or "none"],
             ["default model", pool.default or "the most recently used"],
             ["memory", f"{out.size(health['memory_used'])} used of {out.size(health['max_memory'])}"],
             ["audit log", str(audit.path) + (f" (problem: {audit.error})" if audit.error else "")]]
    out.show(out.table(rows))


def cmd_audit(magics: MLXMagics, args: argparse.Namespace) -> None:
    from .audit_log import FAILED, status_text

    audit = _audit()
    if args.what == "stats":
        stats = audit.stats(model=args.model)
        rows = [[s["model"], s["requests"], s["errors"], f"{s['error_rate']:.0%}",
                 *(None if s[k] is None else out.seconds(s[k])
                   for k in ("p50_duration", "p95_duration", "p50_ttft", "p95_ttft")),
                 None if s["mean_tokens_per_second"] is None else f"{s['mean_tokens_per_second']:.1f}"]
                for s in stats]
        header = ["model", "requests", "errors", "error rate", "p50 time", "p95 time", "p50 TTFT", "p95 TTFT",
                  "tokens/s"]
    else:
        if args.errors:
            found = [r for status in FAILED for r in audit.query(model=args.model, status=status, limit=args.last)]
            found = sorted(found, key=lambda r: r["started_at"], reverse=True)[: args.last]
        else:
            found = audit.query(model=args.model, limit=args.last)
        rows = [[out.local_time(r["started_at"]), r["source"], r["endpoint"], r["model"], status_text(r),
                 f"{r['prompt_tokens'] or 0}→{r['completion_tokens'] or 0}",
                 None if r["ttft"] is None else out.seconds(r["ttft"]),
                 None if r["duration"] is None else out.seconds(r["duration"]),
                 None if r["tokens_per_second"] is None else f"{r['tokens_per_second']:.1f}",
                 f"{r['error_type']}: {(r['error_message'] or '')[:80]}" if r["error_type"] else None] for r in found]
        header = ["time", "source", "endpoint", "model", "status", "tokens", "TTFT", "time", "tokens/s", "error"]
    if not rows:
        print(f"No requests recorded in {audit.path}" + (f" for {args.model}." if args.model else "."))
        return
    out.show(out.table(rows, header))


def cmd_dashboard(magics: MLXMagics, args: argparse.Namespace) -> None:
    try:
        from .widgets import dashboard
    except ImportError as e:
        raise MLXManagerError(f"The dashboard is not available ({e}).") from None
    from IPython.display import display

    display(dashboard(_pool(), _audit()))


def cmd_doctor(magics: MLXMagics, args: argparse.Namespace) -> None:
    from .diagnostics import doctor

    report = doctor(_pool())
    for key in ("physical_memory", "memory_used", "max_memory"):
        report[key] = out.size(report[key])
    report["keep_alive"] = f"{out.seconds(report['keep_alive'])} idle, then a model unloads"
    report["gflops"] = f"{report['gflops']} GFLOPS (1024² float32 matmul)"
    out.show(out.table([[k.replace("_", " "), v] for k, v in report.items()]))


def mlx_parser() -> argparse.ArgumentParser:
    """The ``%mlx`` command line: one subcommand per action, each with ``--help``."""
    p = _Parser(prog="%mlx", description="Manage local MLX models, the HTTP server and the request audit log. "
                                         "`%mlx COMMAND --help` describes a command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, run: Callable, text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=text.replace("%", "%%"), description=text[0].upper() + text[1:] + ".")
        c.set_defaults(run=run)
        return c

    c = add("load", cmd_load, "load a model: 'demo', a folder, a .gguf file, a store name or a Hugging Face repo")
    c.add_argument("model", metavar="MODEL")
    c.add_argument("--as", dest="alias", metavar="ALIAS", help="a short name to use it by")
    c.add_argument("--pin", action="store_true", help="never unload it to make room or when idle")
    c.add_argument("--keep-alive", type=keep_alive, default="default", metavar="SECONDS",
                   help="unload it after this many idle seconds ('forever': never)")
    c.add_argument("--hosts", metavar="H1,H2", help="shard it over one rank per host with mlx.launch "
                   "(the first is this machine; repeat 127.0.0.1 for local ranks)")
    c.add_argument("--hostfile", metavar="FILE", help="an mlx.launch hostfile instead of --hosts")
    c.add_argument("--kv-bits", type=int, choices=(4, 8), default=None,
                   help="quantize its KV caches to 4 or 8 bits (less memory for long contexts, a small quality cost)")
    c.add_argument("--backend", default="ring", choices=("ring", "jaccl", "jaccl-ring", "mpi"),
                   help="mx.distributed backend of a sharded model (default: ring)")
    c.add_argument("--parallel", default="tensor", choices=("tensor", "pipeline"),
                   help="how a sharded model is split (default: tensor)")
    c = add("warm", cmd_warm, "compute a document's KV cache and keep it, in memory and on disk, for prompts that "
                              "start with it (after a kernel restart too)")
    c.add_argument("model", metavar="MODEL", help="a loaded model's name or alias")
    c.add_argument("--file", required=True, metavar="PATH", help="the text: a system prompt, unless --raw")
    c.add_argument("--raw", action="store_true", help="the start of a raw prompt (pool.complete) instead")
    c = add("attach", cmd_attach, "serve a model of an OpenAI-compatible server as a pool entry")
    c.add_argument("name", metavar="NAME", help="its name in the pool")
    c.add_argument("base_url", metavar="URL", help="the server's OpenAI base URL, e.g. http://mac2:8000/v1")
    c.add_argument("--api-key", default=None, help="the server's API key")
    c.add_argument("--model", default=None, help="the server's model id (default: its only model, or NAME)")
    for name, run, text in (("unload", cmd_unload, "unload a model"),
                            ("pin", cmd_pin, "keep a model loaded until unpinned"),
                            ("unpin", cmd_unpin, "let a model be unloaded again when idle or to make room")):
        add(name, run, text).add_argument("name", metavar="NAME", help="model name or alias")
    add("ls", cmd_ls, "list the models on this machine, with their size on disk and where they live")
    c = add("search", cmd_search, "search the Hugging Face hub for models")
    c.add_argument("query", metavar="QUERY")
    c.add_argument("--author", metavar="A", help="only this author's models, e.g. mlx-community")
    c.add_argument("--limit", type=int, default=20, metavar="N", help="how many to show (default 20)")
    c = add("pull", cmd_pull, "download a Hugging Face repo's MLX model into the store (resumes a cut-off pull)")
    c.add_argument("repo", metavar="REPO", help="org/name")
    c = add("rm", cmd_rm, "remove a local model from the store or the Hugging Face cache")
    c.add_argument("name", metavar="NAME", help="its name in `%%mlx ls`")
    c.add_argument("--yes", action="store_true", help="remove it (without: say what would be removed)")
    add("du", cmd_du, "total the disk space local models take")
    add("ps", cmd_ps, "list the loaded models")
    add("default", cmd_default, "show or set the model %%chat uses when none is named").add_argument(
        "model", nargs="?", metavar="MODEL", help="a loaded model's name or alias")
    c = add("import-gguf", cmd_import_gguf, "convert a GGUF file into a model in the store")
    c.add_argument("path", metavar="PATH")
    c.add_argument("--as", dest="name", metavar="NAME", help="the store name (default: from the file name)")
    c = add("convert", cmd_convert, "convert a Hugging Face safetensors model (a repo is pulled first) to MLX "
                                    "in the store, optionally quantized")
    c.add_argument("model", metavar="MODEL", help="org/name, or a local Hugging Face model folder")
    c.add_argument("--q-bits", type=int, choices=(4, 8), help="quantize to 4 or 8 bits (default: keep the dtype)")
    c.add_argument("--as", dest="name", metavar="NAME", help="the store name (default: the repo's name, -4bit...)")
    c = add("serve", cmd_serve, "start the HTTP server (OpenAI and Anthropic style APIs) on the loaded models")
    add_serve_arguments(c)
    c.add_argument("--thread", action="store_true", help="serve from a thread instead of the kernel's event loop")
    add("stop", cmd_stop, "stop the HTTP server")
    add("status", cmd_status, "show the server, the engine and memory use")
    c = add("audit", cmd_audit, "show the latest requests, or per-model statistics with `audit stats`")
    c.add_argument("what", nargs="?", choices=("stats",), help="'stats': per-model latency and error rates")
    c.add_argument("--last", type=int, default=20, metavar="N", help="how many requests to show (default 20)")
    c.add_argument("--model", metavar="M", help="only this model's requests")
    c.add_argument("--errors", action="store_true", help="only failed requests")
    add("dashboard", cmd_dashboard, "show the live dashboard widgets")
    add("doctor", cmd_doctor, "show MLX's device, the BLAS in use with a measured speed, and the settings")
    return p


# -- %%chat -------------------------------------------------------------------------------------


def chat_parser() -> argparse.ArgumentParser:
    from .chain import TOOL_ROUNDS  # loads llguidance: only when chatting

    p = _Parser(prog="%%chat", description=(
        "Send the cell to a model and stream the answer below it. {name} in the cell is filled from the "
        "notebook's variables; write {{ and }} for literal braces. Each conversation remembers its turns."))
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="a loaded model (default: `%%mlx default`, else the most recently used)")
    p.add_argument("-t", "--temperature", type=float, metavar="TEMPERATURE", help="0 is greedy (default 0.7)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="the longest answer, in tokens")
    p.add_argument("--system", metavar="TEXT", help="the conversation's system prompt")
    p.add_argument("--name", default="default", metavar="CONVERSATION", help="which conversation to continue")
    p.add_argument("--new", action="store_true", help="start the conversation over")
    p.add_argument("--out", metavar="VAR",
                   help="store the answer in this variable (the code for --format code, the value for json)")
    p.add_argument("--format", choices=FORMATS, default="markdown",
                   help="code: put the answer's code in a new cell below; json: parse the answer's JSON")
    p.add_argument("--schema", metavar="NAME",
                   help="answer as JSON matching this notebook variable (a pydantic class or a JSON schema "
                        "dict), guaranteed by constrained decoding; --out gets the parsed object")
    p.add_argument("--tools", metavar="NAMES",
                   help="comma-separated notebook variables: Python functions (or lists of them) the model may "
                        f"call; calls run and go back to the model, for at most {TOOL_ROUNDS} rounds")
    p.add_argument("--logprobs", action="store_true",
                   help="after the answer, show each token shaded by its probability, the 5 likeliest "
                        "alternatives on hover (not with --tools)")
    p.add_argument("--tool-choice", metavar="CHOICE",
                   help="auto (default), none, required, or a tool's name, for the first round")
    p.add_argument("--image", action="append", default=[], metavar="PATH_OR_VARIABLE",
                   help="an image to send with the message (repeatable): a file, or a notebook variable holding "
                        "a PIL image, a NumPy array, bytes, a path or a matplotlib figure; for vision models")
    return p


def image_values(namespace: dict, given: list[str]) -> list[dict]:
    """The image parts ``--image`` names: each a notebook variable, else a file."""
    parts = []
    for name in given:
        if name in namespace:
            value = namespace[name]
        elif Path(name).expanduser().is_file():
            value = Path(name).expanduser()
        else:
            raise UsageError(f"%%chat: --image {name}: no such variable in the notebook, nor file.")
        parts.append({"type": "image", "image": value})
    return parts


def notebook_value(namespace: dict, name: str, option: str) -> Any:
    if name not in namespace:
        raise UsageError(f"%%chat: {option} {name}: no such variable in the notebook.")
    return namespace[name]


def schema_value(namespace: dict, name: str) -> Any:
    """The schema named by ``--schema``: a pydantic model class or a dict."""
    value = notebook_value(namespace, name, "--schema")
    if not (isinstance(value, dict) or (isinstance(value, type) and hasattr(value, "model_json_schema"))):
        raise UsageError(f"%%chat: --schema {name} must be a pydantic model class or a JSON schema dict, "
                         f"not {type(value).__name__}.")
    return value


def tools_value(namespace: dict, names: str) -> list:
    """The tools named by ``--tools``: each variable a function, a tool dict, or a list of them."""
    tools: list = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        value = notebook_value(namespace, name, "--tools")
        tools += list(value) if isinstance(value, (list, tuple)) else [value]
    return tools


def fill(template: str, namespace: dict) -> str:
    """Fill ``{name}`` fields from ``namespace`` (``str.format`` rules; ``{{`` is a literal brace)."""
    try:
        return string.Formatter().vformat(template, (), namespace)
    except KeyError as e:
        raise UsageError(f"%%chat: {{{e.args[0]}}} is not defined in the notebook. "
                         f"Define it, or write {{{{ and }}}} for literal braces.") from None
    except IndexError:
        raise UsageError("%%chat: {} needs a variable name inside; write {{}} for literal braces.") from None
    except (AttributeError, TypeError, ValueError) as e:
        raise UsageError(f"%%chat: cannot fill in the message ({e}); write {{{{ and }}}} for literal braces.") from None


def with_system(history: list[dict], system: str | None) -> list[dict]:
    """``history`` with its system message replaced by ``system`` (unchanged if None)."""
    if system is None:
        return list(history)
    return [{"role": "system", "content": system}] + [x for x in history if x["role"] != "system"]


def extract_code(text: str) -> str:
    """The first fenced code block of ``text``, else all of it."""
    match = FENCE.search(text)
    return match.group(1).rstrip() if match else text.strip()


def extract_json(text: str) -> Any:
    """The first JSON object or array in ``text``; ValueError if there is none."""
    decoder = json.JSONDecoder()
    for start in re.finditer(r"[\[{]", text):
        try:
            return decoder.raw_decode(text, start.start())[0]
        except ValueError:
            continue
    raise ValueError("the answer holds no JSON object or array")


def footer(result: Any) -> str:
    """Model, tokens, time to first token and speed, on one line."""
    parts = [result.model, f"{result.usage.completion_tokens} tokens"]
    if result.ttft is not None:
        parts.append(f"first token {out.seconds(result.ttft)}")
    if result.tokens_per_second:
        parts.append(f"{result.tokens_per_second:.1f} tokens/s")
    if result.finish_reason == "length":
        parts.append("stopped at --max-tokens")
    return " · ".join(parts)


def _answer(text: str, fmt: str) -> dict:
    return {"text/plain": text} if fmt == "text" else {"text/markdown": text, "text/plain": text}


def show_stream(stream: Any, live: bool, fmt: str) -> bool:
    """Show the answer as it arrives, updated in place where ``live``; True if it was interrupted."""
    view = out.Live(live)
    if live:
        view.update(_answer("…", fmt), final=True)
    try:
        for delta in stream:
            if live:
                view.update(_answer(stream.text, fmt))
            else:
                print(delta, end="", flush=True)
    except KeyboardInterrupt:
        stream.close()
        return True
    finally:
        if live:
            view.update(_answer(stream.text, fmt), final=True)
        else:
            print()
    return False


def deliver(shell: Any, args: argparse.Namespace, text: str) -> None:
    """Apply ``--format`` code or json to the answer, and store it in ``--out``."""
    value: Any = text
    if args.format == "code":
        value = extract_code(text)
        shell.set_next_input(value, replace=False)
    elif args.format == "json":
        value = extract_json(text)
        out.show({"application/json": value, "text/plain": json.dumps(value, indent=2, ensure_ascii=False)})
    if args.out:
        shell.user_ns[args.out] = value


def chat_asker(args: argparse.Namespace, schema: Any, tools: list, history: list[dict]) -> Callable[..., Any]:
    """``ask(messages, tool_choice)``: one streamed round of a ``%%chat`` with its options."""

    def ask(messages: list[dict], choice: str | dict | None) -> Any:
        try:
            return _pool().chat(messages, model=args.model, stream=True, meta=dict(META), tools=tools or None,
                                tool_choice=choice if tools else None, schema=schema,
                                temperature=args.temperature, max_tokens=args.max_tokens,
                                **({"logprobs": True, "top_logprobs": 5} if args.logprobs else {}))
        except ValueError as e:
            if history and "context" in str(e):
                raise ValueError(f"{e}: `%%chat --new` starts the conversation over") from None
            raise

    return ask


def run_chat(magics: MLXMagics, line: str, cell: str) -> None:
    from .chain import rounds  # loads llguidance: only when chatting
    from .tools import describe_turn, make_tools

    args = parse(chat_parser(), line)
    if args is None:
        return
    if args.out is not None and not args.out.isidentifier():
        raise UsageError(f"%%chat: --out needs a variable name, got {args.out!r}.")
    prompt = fill(cell, magics.shell.user_ns if magics.shell is not None else {}).strip()
    if not prompt:
        raise UsageError("%%chat: the cell is empty; write your message below the %%chat line.")
    history = [] if args.new else magics.conversations.get(args.name, [])
    ns = magics.shell.user_ns if magics.shell is not None else {}
    images = image_values(ns, args.image)
    content = [{"type": "text", "text": prompt}, *images] if images else prompt
    messages = [*with_system(history, args.system), {"role": "user", "content": content}]
    schema = schema_value(ns, args.schema) if args.schema else None
    tools = make_tools(tools_value(ns, args.tools)) if args.tools else []
    ask = chat_asker(args, schema, tools, history)
    live = out.can_update(magics.shell)
    for stream in rounds(ask, messages, tools, tool_choice=args.tool_choice,
                         on_turns=lambda turns: print("\n".join(describe_turn(t) for t in turns))):
        interrupted = show_stream(stream, live, args.format)
        if interrupted:
            break
    magics.conversations[args.name] = [*messages, {"role": "assistant", "content": stream.text}]
    if interrupted:
        raise Interrupted(f"generation stopped; the partial answer is kept in conversation {args.name!r}")
    out.show(out.note(footer(stream.result)))
    if args.logprobs and stream.result is not None and stream.result.logprobs is not None:
        out.show(out.token_probabilities(stream.result.logprobs))
    if args.schema:
        assert stream.result is not None
        parsed = stream.result.parsed
        value = parsed.model_dump(mode="json") if hasattr(parsed, "model_dump") else parsed
        out.show({"application/json": value, "text/plain": json.dumps(value, indent=2, ensure_ascii=False)})
        if args.out:
            ns[args.out] = parsed
        return
    deliver(magics.shell, args, stream.text)


# -- the Magics class ---------------------------------------------------------------------------


def _guarded(fn: Callable[[], None]) -> None:
    """Run ``fn``, showing a user's mistake or a library error as one line."""
    try:
        fn()
    except UsageError as e:
        out.error(str(e))
    except ModelNotFoundError as e:
        out.error(f"{type(e).__name__}: {e} {HINT}")
    except (MLXManagerError, ValueError, OSError) as e:
        out.error(f"{type(e).__name__}: {e}")


@magics_class
class MLXMagics(Magics):
    """``%mlx`` and ``%%chat``; holds the notebook's conversations."""

    def __init__(self, shell: Any = None):
        super().__init__(shell)
        self.conversations: dict[str, list[dict]] = {}

    @line_magic
    def mlx(self, line: str) -> None:
        """Manage models, the HTTP server and the audit log: `%mlx --help` lists the commands."""

        def run() -> None:
            args = parse(mlx_parser(), line)
            if args is None:
                return
            if args.command is None:
                mlx_parser().print_help()
                return
            args.run(self, args)

        _guarded(run)

    @cell_magic
    def chat(self, line: str, cell: str) -> None:
        """Chat with a loaded model: `%%chat --help` lists the options."""
        _guarded(lambda: run_chat(self, line, cell))


def load(ip: Any) -> None:
    """Register the magics in ``ip`` and print the banner."""
    ip.register_magics(MLXMagics)
    print(banner())
