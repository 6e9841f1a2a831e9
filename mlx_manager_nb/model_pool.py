"""The model pool: load, unload, pin and evict models, and run chat and completion requests.

>>> from mlx_manager_nb import pool
>>> pool.load("demo")
>>> pool.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0).text
'The capital of France is Paris.'
>>> for delta in pool.chat([{"role": "user", "content": "Count to 3"}], stream=True):
...     print(delta, end="")

One :class:`~mlx_manager_nb.engine.Engine` thread does all MLX work; the pool's methods can be
called from any thread, and the ``a``-prefixed ones from a running event loop without blocking it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model
from mlx_lm.utils import load as load_model  # imported here: transformers first imported on a worker

# thread leaves a C++ thread that aborts the process at exit ("terminate called...")
from . import embeddings, store
from .audit_log import new_request_id, utc_now
from .engine import Delta, Done, Engine, Event, Failed, Request, Runner
from .errors import InvalidModelError, ModelNotFoundError, PoolFullError
from .params import DEFAULT_MAX_TOKENS, make_params
from .streams import AsyncTextStream, Result, TextStream, async_sink, queue_sink

ROLES = ("system", "user", "assistant")
Listener = Callable[[dict], None]


@dataclass(frozen=True)
class ModelInfo:
    """A snapshot of one model in the pool."""

    name: str
    alias: str | None
    ref: str
    path: Path | None
    state: str  # "loading", "ready", "unloading" or "failed"
    size_bytes: int
    last_used: float  # epoch seconds
    in_flight: int
    pinned: bool
    keep_alive: float | None  # seconds of idleness before unloading; None: never
    expires_at: float | None  # epoch seconds, None when pinned or kept forever
    context_length: int | None = None
    error: str | None = None
    kind: str = "chat"  # or "embedding"


def _why_held(m: ModelInfo) -> str:
    return "pinned" if m.pinned else f"{m.in_flight} in flight" if m.in_flight else m.state


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _model_bytes(model: Any) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def _load_runner(name: str, path: Path, progress: Callable[[str, float], None], dequantize: bool) -> Runner:
    """Load weights and tokenizer (on the engine thread), reporting progress per tensor.

    ``dequantize`` turns quantized layers into float32 ones: on CPUs, MLX's quantized kernels are
    slow and do not speed up with batching, while float32 matmuls go through an optimized BLAS.
    """
    try:
        model, tokenizer = load_model(str(path), lazy=True)
        if dequantize:
            model = dequantize_model(model)
            model.set_dtype(mx.float32)
        params = tree_flatten(model.parameters())
        for i, (_, v) in enumerate(params):
            mx.eval(v)
            if i % 16 == 0:
                progress("loading weights", 0.1 + 0.85 * i / max(1, len(params)))
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise InvalidModelError(f"cannot load {path}: {e}") from None
    return Runner(name, model, tokenizer)


class Pool:
    """Models loaded in this process, shared by the notebook, the widgets and the HTTP server.

    ``max_models`` and ``max_memory`` (bytes) bound the pool: loading past them evicts the least
    recently used idle, unpinned model. ``keep_alive`` (seconds, None for ever) unloads models
    left idle that long. ``dequantize`` loads quantized models as float32: None (the default) does
    so on CPU devices when the float weights fit in ``max_memory``. ``audit`` is an
    :class:`~mlx_manager_nb.audit_log.AuditLog` or None.
    """

    def __init__(
        self,
        max_models: int = 4,
        max_memory: int | None = None,
        keep_alive: float | None = 1800.0,
        audit: Any = None,
        dequantize: bool | None = None,
    ):
        self.max_models = max_models
        self.max_memory = max_memory if max_memory is not None else int(physical_memory() * 0.5)
        self.keep_alive = keep_alive
        self.audit = audit
        self.dequantize = dequantize
        self.default: str | None = None
        self.engine = Engine(on_tick=self._reap_idle)
        if mx.default_device().type == mx.DeviceType.cpu and os.environ.get("MLX_NB_COMPILE") != "1":
            # On CPU, mx.compile builds C++ kernels with the system compiler for each new shape: a
            # second or more per new prompt length or batch size, for no steady-state gain.
            mx.disable_compile()
        self._lock = threading.RLock()
        self._models: dict[str, ModelInfo] = {}
        self._loading: dict[str, Future] = {}
        self._in_flight: dict[str, int] = {}
        self._listeners: list[Listener] = []

    # -- observers ----------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` for model-state, progress and request events; returns unsubscribe.

        Events are dicts with a ``type`` of ``"model"``, ``"progress"`` or ``"request"``. Listeners
        run on the thread that caused the event (often the engine thread): keep them short.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _publish(self, event: dict) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                pass

    def _set(self, name: str, **changes: Any) -> ModelInfo:
        with self._lock:
            info = self._models[name] = replace(self._models[name], **changes)
        self._publish({"type": "model", "name": name, "state": info.state, "model": info})
        return info

    # -- models ---------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """Every model in the pool, with its live in-flight count."""
        with self._lock:
            infos = list(self._models.values())
        return [replace(i, in_flight=self._in_flight.get(i.name, 0)) for i in infos]

    def memory_used(self) -> int:
        return sum(m.size_bytes for m in self.models() if m.state in ("ready", "loading"))

    def find(self, model: str | None, kind: str | None = None) -> ModelInfo:
        """The loaded model a name, alias or reference stands for; None: the default, else the last used of `kind`."""
        with self._lock:
            ready = [m for m in self._models.values() if m.state == "ready"]
            if model is None:
                model = self.default
                if model is None:
                    of_kind = [m for m in ready if kind is None or m.kind == kind]
                    if not of_kind:
                        raise ModelNotFoundError("No model is loaded. Load one first, e.g. pool.load('demo').")
                    return max(of_kind, key=lambda m: m.last_used)
            for m in ready:
                if model in (m.name, m.alias, m.ref):
                    return m
        loaded = ", ".join(m.alias or m.name for m in ready) or "none"
        local = ", ".join(m.name for m in store.list_local_models()) or "none"
        raise ModelNotFoundError(f"Model {model!r} is not loaded. Loaded: {loaded}. Available to load: {local}.")

    def is_loaded(self, model: str) -> bool:
        try:
            self.find(model)
            return True
        except ModelNotFoundError:
            return False

    def load(
        self,
        ref: str | os.PathLike,
        alias: str | None = None,
        pin: bool = False,
        keep_alive: float | None | str = "default",
        progress: Callable[[str, float], None] | None = None,
    ) -> ModelInfo:
        """Load a model (see :func:`mlx_manager_nb.store.resolve` for references); return its info.

        A model already loaded is returned as is; two concurrent loads of the same model load it once.
        """
        ref = str(ref)
        with self._lock:
            for m in self._models.values():
                if m.state == "ready" and ref in (m.ref, m.name, m.alias):
                    return self._touch(m.name, alias=alias or m.alias, pinned=m.pinned or pin)
        report = self._progress_reporter(ref, progress)
        path = store.resolve(ref, report)
        name = store.model_name(ref, path)
        with self._lock:
            fut = self._loading.get(name)
            owner = fut is None
            if owner:
                fut = self._loading[name] = Future()
        if not owner:
            return fut.result()
        try:
            info = self._load_new(name, ref, path, alias, pin, keep_alive, report)
            fut.set_result(info)
            return info
        except BaseException as e:
            fut.set_exception(e)
            raise
        finally:
            with self._lock:
                self._loading.pop(name, None)

    async def aload(self, ref: str | os.PathLike, **kwargs: Any) -> ModelInfo:
        """:meth:`load` without blocking the running event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, lambda: self.load(ref, **kwargs))

    def _progress_reporter(self, ref: str, progress: Callable | None) -> Callable[[str, float], None]:
        def report(stage: str, fraction: float) -> None:
            if progress:
                progress(stage, fraction)
            self._publish({"type": "progress", "name": ref, "stage": stage, "fraction": fraction})

        return report

    def _load_new(self, name, ref, path, alias, pin, keep_alive, report) -> ModelInfo:
        if name in self._models and self._models[name].state == "ready":
            return self._touch(name, alias=alias or self._models[name].alias, pinned=pin or self._models[name].pinned)
        config = store.describe(path)
        kind = embeddings.model_kind(path)
        context = embeddings.max_length(path) if kind == "embedding" else config.context_length
        disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        dequantize, estimate = self._dequantize_plan(path, disk, name)
        self._make_room(estimate, exclude=name)
        ka = self.keep_alive if keep_alive == "default" else keep_alive
        with self._lock:
            self._models[name] = ModelInfo(name, alias, ref, path, "loading", estimate, time.time(), 0, pin, ka,
                                           None, context, kind=kind)
        self._publish({"type": "model", "name": name, "state": "loading", "model": self._models[name]})
        report("loading weights", 0.0)

        def load_on_engine() -> Runner:
            runner = (embeddings.load_runner(name, path, report) if kind == "embedding"
                      else _load_runner(name, path, report, dequantize))
            self.engine.runners[name] = runner
            return runner

        try:
            runner = self.engine.run(load_on_engine).result()
        except BaseException as e:
            self._set(name, state="failed", error=str(e))
            with self._lock:
                self._models.pop(name, None)
            raise
        report("ready", 1.0)
        self._set(name, state="ready", size_bytes=_model_bytes(runner.model))
        return self._touch(name)

    def _dequantize_plan(self, path: Path, disk: int, name: str) -> tuple[bool, int]:
        """Whether to load quantized weights as float32, and the bytes the model will take."""
        quantization = store.read_config(path).get("quantization")
        if not quantization or self.dequantize is False:
            return False, disk
        bits = quantization.get("bits", 4)
        floats = int(disk * 32 / (bits + 1))  # scales and biases add about one bit per weight
        if self.dequantize is None:
            on_cpu = mx.default_device().type == mx.DeviceType.cpu
            held = [m for m in self.models() if m.name != name and (m.pinned or m.in_flight)]
            room = self.max_memory - sum(m.size_bytes for m in held)
            if not on_cpu or floats > room:
                return False, disk
        return True, floats

    def _touch(self, name: str, **changes: Any) -> ModelInfo:
        now = time.time()
        info = self._models[name]
        ka = changes.get("keep_alive", info.keep_alive)
        pinned = changes.get("pinned", info.pinned)
        expires = None if pinned or ka is None else now + ka
        return self._set(name, last_used=now, expires_at=expires, **changes)

    def _make_room(self, needed: int, exclude: str) -> None:
        """Evict least recently used idle, unpinned models until `needed` more bytes and one more model fit."""
        while True:
            with self._lock:
                live = [m for m in self.models() if m.state in ("ready", "loading") and m.name != exclude]
                too_many = len(live) >= self.max_models
                too_big = sum(m.size_bytes for m in live) + needed > self.max_memory
                if not (too_many or too_big):
                    return
                idle = [m for m in live if m.state == "ready" and not m.pinned and m.in_flight == 0]
                if not idle:
                    holders = ", ".join(f"{m.name} ({_why_held(m)}, {m.size_bytes / 2**20:.0f} MiB)" for m in live)
                    limit = (f"max_models={self.max_models}" if too_many
                             else f"max_memory={self.max_memory / 2**20:.0f} MiB, {needed / 2**20:.0f} MiB needed")
                    raise PoolFullError(f"Pool full ({limit}) and nothing can be evicted: {holders}")
                victim = min(idle, key=lambda m: m.last_used)
                self._set(victim.name, state="unloading")
            self.engine.run(self._unload_on_engine, victim.name).result()

    def _unload_on_engine(self, name: str) -> None:
        runner = self.engine.runners.pop(name, None)
        if runner is not None:
            for seq in runner.active.values():
                seq.request.cancelled.set()
                seq.request.emit(Failed(ModelNotFoundError(f"model {name!r} was unloaded")))
            runner.active.clear()
            del runner
        mx.clear_cache()
        with self._lock:
            info = self._models.pop(name, None)
            if self.default in (name, getattr(info, "alias", None)):
                self.default = None
        if info is not None:
            gone = replace(info, state="unloaded")
            self._publish({"type": "model", "name": name, "state": "unloaded", "model": gone})

    def unload(self, name: str) -> None:
        """Unload a model (by name or alias); requests still running on it fail."""
        info = self._get(name)
        self._set(info.name, state="unloading")
        self.engine.run(self._unload_on_engine, info.name).result()
        if self.audit is not None:
            self.audit.flush()

    def _get(self, name: str) -> ModelInfo:
        with self._lock:
            for m in self._models.values():
                if name in (m.name, m.alias, m.ref):
                    return m
        present = ", ".join(self._models) or "none"
        raise ModelNotFoundError(f"Model {name!r} is not in the pool. In the pool: {present}.")

    def pin(self, name: str) -> ModelInfo:
        """Exempt a model from eviction and idle unloading."""
        return self._touch(self._get(name).name, pinned=True)

    def unpin(self, name: str) -> ModelInfo:
        return self._touch(self._get(name).name, pinned=False)

    def _reap_idle(self) -> None:
        """Unload models idle past their keep-alive (runs on the engine thread)."""
        now = time.time()
        for m in self.models():
            if m.state == "ready" and m.expires_at is not None and m.expires_at < now and m.in_flight == 0:
                self._set(m.name, state="unloading")
                self._unload_on_engine(m.name)

    # -- requests -------------------------------------------------------------------------------

    def _chat_tokens(self, runner: Runner, messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m!r}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
        if not getattr(runner.tokenizer, "chat_template", None):
            raise ValueError(f"model {runner.name!r} has no chat template: use complete() with a raw prompt")
        return list(runner.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def _prompt_tokens(self, runner: Runner, prompt: Any) -> list[int]:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string")
        return list(runner.tokenizer.encode(prompt))

    def count_tokens(self, messages: Any = None, model: str | None = None, prompt: str | None = None) -> int:
        """How many tokens a chat (or a raw prompt) takes with the model's template."""
        info = self._chat_model(model)
        runner = self.engine.runners[info.name]
        return len(self._prompt_tokens(runner, prompt) if prompt is not None else self._chat_tokens(runner, messages))

    def _chat_model(self, model: str | None) -> ModelInfo:
        info = self.find(model, kind="chat")
        if info.kind != "chat":
            raise ValueError(f"model {info.alias or info.name!r} is an {info.kind} model: it cannot chat or complete; "
                             f"use pool.embed() or /v1/embeddings")
        return info

    def _start(self, kind: str, content: Any, model: str | None, sink: Callable[[Event], None],
               meta: dict | None, timeout: float | None, params: dict) -> tuple[str, str, Request]:
        info = self._chat_model(model)
        runner = self.engine.runners[info.name]
        tokens = self._chat_tokens(runner, content) if kind == "chat" else self._prompt_tokens(runner, content)
        p = make_params(**params)
        ctx = info.context_length
        if ctx is not None:
            if len(tokens) >= ctx:
                raise ValueError(f"the prompt is {len(tokens)} tokens; {info.name}'s context is {ctx}")
            if params.get("max_tokens") is not None and len(tokens) + p.max_tokens > ctx:
                raise ValueError(
                    f"max_tokens={p.max_tokens} plus the {len(tokens)}-token prompt exceeds "
                    f"{info.name}'s context of {ctx}"
                )
            if params.get("max_tokens") is None:
                p = replace(p, max_tokens=min(DEFAULT_MAX_TOKENS, ctx - len(tokens)))
        meta = dict(meta or {})
        meta["audit"] = meta.get("audit") or self.audit
        request_id = meta.get("id") or new_request_id()
        started, started_at = time.time(), utc_now()
        text: list[str] = []

        def emit(event: Event) -> None:
            if isinstance(event, Delta):
                text.append(event.text)
            elif isinstance(event, (Done, Failed)):
                self._finished(info.name, request_id, started, started_at, kind, content, "".join(text), event, meta)
            sink(event)

        request = Request(info.name, tokens, p, emit,
                          deadline=time.perf_counter() + timeout if timeout else None)
        with self._lock:
            self._in_flight[info.name] = self._in_flight.get(info.name, 0) + 1
            self._touch(info.name)
        self._publish({"type": "request", "phase": "start", "id": request_id, "model": info.name,
                       "source": meta.get("source", "api")})
        self.engine.submit(request)
        return request_id, info.alias or info.name, request

    def _finished(self, name: str, request_id: str, started: float, started_at: str, kind: str, content: Any, text: str,
                  event: Done | Failed, meta: dict) -> None:
        with self._lock:
            self._in_flight[name] = self._in_flight.get(name, 1) - 1
            if name in self._models:
                self._touch(name)
        row = {
            "id": request_id,
            "started_at": started_at,
            "source": meta.get("source", "api"),
            "endpoint": meta.get("endpoint", f"pool.{kind}"),
            "protocol": meta.get("protocol", "python"),
            "model": name,
            "stream": bool(meta.get("stream", False)),
            "client": meta.get("client"),
            "user_agent": meta.get("user_agent"),
            "http_status": meta.get("http_status"),
        }
        if isinstance(event, Done):
            status = event.finish_reason if event.finish_reason in ("cancelled", "timeout") else "ok"
            row.update(status=status, prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                       ttft=event.ttft, duration=event.duration, tokens_per_second=event.tokens_per_second,
                       finish_reason=event.finish_reason)
        else:
            row.update(status="error", error_type=type(event.error).__name__, error_message=str(event.error)[:500],
                       duration=time.time() - started)
        self._publish({"type": "request", "phase": "end", **row})
        if meta["audit"] is not None:
            meta["audit"].record(row, {"prompt": content, "completion": text})

    def rejected(self, error: BaseException, model: str | None, meta: dict | None, kind: str = "chat") -> None:
        """Record a request refused before it reached the engine (bad input, unknown model)."""
        meta = meta or {}
        if model is None:  # the model the request would have gone to, so stats group it there
            try:
                model = self.find(None).name
            except ModelNotFoundError:
                pass
        row = {
            "id": meta.get("id") or new_request_id(), "started_at": utc_now(), "status": "error",
            "source": meta.get("source", "api"), "endpoint": meta.get("endpoint", f"pool.{kind}"),
            "protocol": meta.get("protocol", "python"), "model": model, "stream": bool(meta.get("stream")),
            "http_status": meta.get("http_status"), "client": meta.get("client"),
            "user_agent": meta.get("user_agent"), "error_type": type(error).__name__,
            "error_message": str(error)[:500],
        }
        self._publish({"type": "request", "phase": "end", **row})
        audit = meta.get("audit") or self.audit
        if audit is not None:
            audit.record(row)

    def _start_or_record(self, kind, content, model, sink, meta, timeout, params):
        try:
            return self._start(kind, content, model, sink, meta, timeout, params)
        except Exception as e:
            self.rejected(e, model, meta, kind)
            raise

    def _run(self, kind: str, content: Any, model: str | None, stream: bool, meta: dict | None,
             timeout: float | None, params: dict) -> Result | TextStream:
        events, sink = queue_sink()
        meta = {"stream": stream, **(meta or {})}
        request_id, name, request = self._start_or_record(kind, content, model, sink, meta, timeout, params)
        s = TextStream(request_id, name, request, events)
        if stream:
            return s
        with s:
            for _ in s:
                pass
        assert s.result is not None
        return s.result

    def _arun(self, kind: str, content: Any, model: str | None, stream: bool, meta: dict | None,
              timeout: float | None, params: dict) -> Any:
        events, sink = async_sink(asyncio.get_running_loop())
        meta = {"stream": stream, **(meta or {})}
        request_id, name, request = self._start_or_record(kind, content, model, sink, meta, timeout, params)
        s = AsyncTextStream(request_id, name, request, events)
        return s if stream else s.collect()

    def chat(self, messages: list[dict], model: str | None = None, stream: bool = False, *,
             meta: dict | None = None, timeout: float | None = None, **params: Any) -> Result | TextStream:
        """Answer a conversation with the model's chat template.

        ``params``: temperature, top_p, top_k, min_p, repetition_penalty, seed, max_tokens, stop.
        ``stream=True`` returns a :class:`TextStream` of deltas. ``meta`` holds audit fields
        (source, endpoint, protocol, id...). Bad input raises ValueError naming the field.
        """
        return self._run("chat", messages, model, stream, meta, timeout, params)

    def complete(self, prompt: str, model: str | None = None, stream: bool = False, *,
                 meta: dict | None = None, timeout: float | None = None, **params: Any) -> Result | TextStream:
        """Continue a raw prompt (no chat template)."""
        return self._run("complete", prompt, model, stream, meta, timeout, params)

    def achat(self, messages: list[dict], model: str | None = None, stream: bool = False, *,
              meta: dict | None = None, timeout: float | None = None, **params: Any) -> Any:
        """``await pool.achat(...)`` for a Result, ``async for d in pool.achat(..., stream=True)`` for deltas.

        Must be called from a running event loop, which it never blocks.
        """
        return self._arun("chat", messages, model, stream, meta, timeout, params)

    def acomplete(self, prompt: str, model: str | None = None, stream: bool = False, *,
                  meta: dict | None = None, timeout: float | None = None, **params: Any) -> Any:
        return self._arun("complete", prompt, model, stream, meta, timeout, params)

    def embed(self, texts: embeddings.Inputs, model: str | None = None, *, truncate: bool = False,
              dimensions: int | None = None, meta: dict | None = None) -> np.ndarray:
        """Embed a text (a vector) or a list of texts (a matrix, one row each) with an embedding model.

        Rows are normalized if the model's pooling config says so. Texts longer than the model's
        limit raise ValueError unless ``truncate=True``; ``dimensions`` shortens Matryoshka models'
        vectors. Concurrent calls share forward passes.
        """
        return embeddings.single(texts, embeddings.run(self, texts, model, truncate=truncate,
                                                       dimensions=dimensions, meta=meta).vectors)

    async def aembed(self, texts: embeddings.Inputs, model: str | None = None, *, truncate: bool = False,
                     dimensions: int | None = None, meta: dict | None = None) -> np.ndarray:
        """:meth:`embed` without blocking the running event loop."""
        done = await embeddings.arun(self, texts, model, truncate=truncate, dimensions=dimensions, meta=meta)
        return embeddings.single(texts, done.vectors)

    def health(self) -> dict:
        """Engine liveness and what is loaded."""
        error = self.engine.error
        return {
            "engine": "alive" if self.engine.alive else ("dead" if error else "idle"),
            "engine_error": repr(error) if error else None,
            "models": [m.alias or m.name for m in self.models() if m.state == "ready"],
            "memory_used": self.memory_used(),
            "max_memory": self.max_memory,
        }

    def close(self) -> None:
        """Unload every model and flush the audit log."""
        for m in self.models():
            try:
                self.unload(m.name)
            except ModelNotFoundError:
                pass
        if self.audit is not None:
            self.audit.flush()
