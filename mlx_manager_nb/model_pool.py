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
import contextlib
import functools
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, overload

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.utils import dequantize_model

# imported here, not lazily: transformers first imported on a worker thread leaves a C++ thread
# that aborts the process at exit ("terminate called...")
from mlx_lm.utils import load as load_model

from . import embeddings, store
from .audit_log import audit_row, error_fields, new_request_id, utc_now
from .chain import TOOL_ROUNDS, rounds
from .engine import Delta, Done, Engine, Event, Failed, Request, Runner
from .errors import ContextLengthError, InvalidModelError, InvalidParameterError, ModelNotFoundError, PoolFullError
from .params import DEFAULT_MAX_TOKENS, fit_to_model, make_params
from .streams import AsyncTextStream, Final, Result, StreamEvent, TextStream, async_sink, queue_sink
from .structured import Plan, plan
from .tools import ParsedItem, ToolCall, make_tools

ROLES = ("system", "user", "assistant", "tool")
#: chat() keywords about tools and structure, planned by :func:`mlx_manager_nb.structured.plan`
STRUCTURE = ("tools", "tool_choice", "schema", "response_format", "parallel_tool_calls")


@dataclass(frozen=True)
class ModelEvent:
    """A model changed state: ``loading``, ``ready``, ``unloading``, ``unloaded`` or ``failed``."""

    name: str
    state: str
    model: ModelInfo


@dataclass(frozen=True)
class ProgressEvent:
    """Progress of a load: ``stage`` (e.g. "loading weights") and ``fraction`` done, 0 to 1."""

    name: str
    stage: str
    fraction: float


@dataclass(frozen=True)
class RequestEvent:
    """A request started (``row`` holds id, model and source) or ended (``row`` is its audit row)."""

    phase: str  # "start" or "end"
    row: dict


PoolEvent = ModelEvent | ProgressEvent | RequestEvent
Listener = Callable[[PoolEvent], None]


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
    kv_bytes: int = 0  # KV caches of its running sequences
    cache_bytes: int = 0  # its prompt cache
    kind: str = "chat"  # or "embedding"
    placement: str = "local"  # "local", "sharded" (ranks started by mlx.launch) or "attached" (an OpenAI server)
    hosts: tuple[str, ...] = ()  # a sharded model's hosts, rank by rank, or an attached model's base URL
    ranks: tuple[dict, ...] = ()  # a sharded model's per-rank state (see ShardedModel.ranks)


def _why_held(m: ModelInfo) -> str:
    return "pinned" if m.pinned else f"{m.in_flight} in flight" if m.in_flight else m.state


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _model_bytes(model: Any) -> int:
    flat: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    return sum(v.nbytes for _, v in flat)


def _load_runner(name: str, path: Path, progress: Callable[[str, float], None], dequantize: bool) -> Runner:
    """Load weights and tokenizer (on the engine thread), reporting progress per tensor.

    ``dequantize`` turns quantized layers into float32 ones: on CPUs, MLX's quantized kernels are
    slow and do not speed up with batching, while float32 matmuls go through an optimized BLAS.
    """
    try:
        model, tokenizer = load_model(str(path), lazy=True)[:2]
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
    if getattr(tokenizer, "chat_template", None):
        try:  # a template that cannot render would fail every chat request: refuse the model now
            tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
        except Exception as e:
            raise InvalidModelError(f"model {name!r}: its chat template does not render "
                                    f"({type(e).__name__}: {str(e)[:200]})") from None
    return Runner(name, model, tokenizer, max_token_chars=max(map(len, tokenizer.vocab), default=1) or 1)


def _check_text(value: Any, where: str, allow_empty: bool) -> None:
    if not isinstance(value, str) or not (value or allow_empty):
        raise InvalidParameterError(where, f"{where} must be a {'' if allow_empty else 'non-empty '}string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidParameterError(where, f"{where} is not valid Unicode text (it holds a lone surrogate)") from None


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise InvalidParameterError(where, f"{where} must be a list of tool calls")
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("arguments", "{}"), (str, dict)):
            raise InvalidParameterError(f"{where}[{j}]", f"{where}[{j}] must be "
                                        '{"id": ..., "type": "function", "function": {"name": ..., "arguments": ...}}')


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
        self._remote: dict[str, Any] = {}  # models served by other processes (see mlx_manager_nb.distributed)

    # -- observers ----------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event)`` for each :class:`ModelEvent`, :class:`ProgressEvent` and
        :class:`RequestEvent`; returns the unsubscribe function.

        Listeners run on the thread that caused the event (often the engine thread): keep them short.
        """
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _publish(self, event: PoolEvent) -> None:
        for listener in list(self._listeners):
            with contextlib.suppress(Exception):
                listener(event)

    def _set(self, name: str, **changes: Any) -> ModelInfo:
        with self._lock:
            info = self._models[name] = replace(self._models[name], **changes)
        self._publish(ModelEvent(name, info.state, info))
        return info

    # -- models ---------------------------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        """Every model in the pool, with its live in-flight count."""
        with self._lock:
            infos = list(self._models.values())
        memory = self.engine.model_memory()
        return [replace(i, in_flight=self._in_flight.get(i.name, 0), kv_bytes=memory.get(i.name, (0, 0))[0],
                        cache_bytes=memory.get(i.name, (0, 0))[1],
                        ranks=self._remote[i.name].ranks() if i.name in self._remote else i.ranks) for i in infos]

    def memory_used(self) -> int:
        """Bytes the pool's models hold: weights, KV caches of running requests and prompt caches."""
        return sum(m.size_bytes + m.kv_bytes + m.cache_bytes for m in self.models() if m.state in ("ready", "loading"))

    def _lookup(self, model: str | None, kind: str | None = None) -> ModelInfo | None:
        """The ready model a name, alias, reference stands for; None: the default, else the last used of ``kind``."""
        with self._lock:
            ready = [m for m in self._models.values() if m.state == "ready"]
            if model is None:
                model = self.default
                if model is None:
                    of_kind = [m for m in ready if kind is None or m.kind == kind]
                    return max(of_kind, key=lambda m: m.last_used) if of_kind else None
            return next((m for m in ready if model in (m.name, m.alias, m.ref)), None)

    def find(self, model: str | None, kind: str | None = None) -> ModelInfo:
        """The loaded model a name, alias or reference stands for; None: the default, else the last used of ``kind``."""
        info = self._lookup(model, kind)
        if info is not None:
            return info
        if model is None and self.default is None:
            raise ModelNotFoundError("No model is loaded. Load one first, e.g. pool.load('demo').")
        loaded = ", ".join(m.alias or m.name for m in self.models() if m.state == "ready") or "none"
        local = ", ".join(m.name for m in store.list_local_models()) or "none"
        raise ModelNotFoundError(f"Model {model or self.default!r} is not loaded. Loaded: {loaded}. "
                                 f"Available to load: {local}.")

    def is_loaded(self, model: str) -> bool:
        return self._lookup(model) is not None

    def load(
        self,
        ref: str | os.PathLike,
        alias: str | None = None,
        pin: bool = False,
        keep_alive: float | str | None = "default",
        progress: Callable[[str, float], None] | None = None,
        hosts: list[str] | None = None,
        backend: str = "ring",
        parallel: str = "tensor",
        hostfile: str | None = None,
    ) -> ModelInfo:
        """Load a model (see :func:`mlx_manager_nb.store.resolve` for references); return its info.

        A model already loaded is returned as is; two concurrent loads of the same model load it once.
        ``hosts`` (or an mlx.launch ``hostfile``) shards it over one rank per host with ``mx.distributed``
        (``backend``: ring, jaccl, jaccl-ring or mpi; ``parallel``: "tensor" or "pipeline"), served by
        :mod:`mlx_manager_nb.distributed`; e.g. ``hosts=["127.0.0.1", "127.0.0.1"]``.
        """
        ref = str(ref)
        if hosts or hostfile:
            return self._load_sharded(ref, alias, pin, keep_alive, progress, list(hosts or []), backend, parallel,
                                      hostfile)
        with self._lock:
            for m in self._models.values():
                if m.state == "ready" and m.placement == "local" and ref in (m.ref, m.name, m.alias):
                    return self._touch(m.name, alias=alias or m.alias, pinned=m.pinned or pin)
        report = self._progress_reporter(ref, progress)
        path = store.resolve(ref, report)
        name = store.model_name(ref, path)
        with self._lock:
            waiting = self._loading.get(name)
            if waiting is None:
                fut = self._loading[name] = Future()
        if waiting is not None:
            return waiting.result()
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
            self._publish(ProgressEvent(ref, stage, fraction))

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
        self._publish(ModelEvent(name, "loading", self._models[name]))
        report("loading weights", 0.0)

        def load_on_engine() -> Runner:
            runner = (embeddings.load_runner(name, path, report) if kind == "embedding"
                      else _load_runner(name, path, report, dequantize))
            runner.kv_budget = self.max_memory // self.max_models  # each model's share for KV caches
            self.engine.add_runner(runner)
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
        remote = self._remote.pop(name, None)
        if remote is not None:
            remote.close(ModelNotFoundError(f"model {name!r} was unloaded"))
        self.engine.remove_runner(name, ModelNotFoundError(f"model {name!r} was unloaded"))
        with self._lock:
            info = self._models.pop(name, None)
            if self.default in (name, getattr(info, "alias", None)):
                self.default = None
        if info is not None:
            gone = replace(info, state="unloaded")
            self._publish(ModelEvent(name, "unloaded", gone))

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

    # -- models served by other processes (mlx_manager_nb.distributed) ----------------------------

    def _runner(self, name: str) -> Any:
        """What serves ``name``: its engine Runner, or a remote runner (sharded or attached)."""
        return self._remote.get(name) or self.engine.runner(name)

    def _load_sharded(self, ref: str, alias: str | None, pin: bool, keep_alive: float | str | None,
                      progress: Callable | None, hosts: list[str], backend: str, parallel: str,
                      hostfile: str | None) -> ModelInfo:
        from .distributed.sharded import ShardedModel, hostfile_hosts

        report = self._progress_reporter(ref, progress)
        path = store.resolve(ref, report)
        hosts = hosts or hostfile_hosts(hostfile)
        name = f"{store.model_name(ref, path)}@{parallel}{len(hosts)}"
        if self._lookup(name) is not None:
            return self._touch(name, alias=alias or self._models[name].alias, pinned=self._models[name].pinned or pin)
        disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        on_this_machine = 1 + sum(h in ("127.0.0.1", "localhost", "::1") for h in hosts[1:])
        return self._add_remote(
            name, ref, path, alias, pin, keep_alive, "sharded", tuple(hosts), disk * on_this_machine // len(hosts),
            lambda failed: ShardedModel(name, path, hosts, backend, parallel, hostfile, on_failure=failed))

    def attach(self, name: str, base_url: str, api_key: str | None = None, model: str | None = None,
               pin: bool = False, keep_alive: float | str | None = "default") -> ModelInfo:
        """Serve a model of an OpenAI-compatible server (another machine's ``mlx_manager_nb serve``, or any)
        as the pool entry ``name``: requests are proxied with streaming, cancellation and audit rows.

        ``base_url`` ends with ``/v1`` as for OpenAI's client; ``model`` is the server's model id
        (default: its only model, listed under any number of names and aliases, or ``name``).
        """
        from .distributed.attached import AttachedModel

        if name in self._models:
            raise InvalidParameterError("name", f"{name!r} is already in the pool")
        return self._add_remote(name, base_url, None, None, pin, keep_alive, "attached", (base_url,), 0,
                                lambda failed: AttachedModel(name, base_url, api_key, model))

    def _add_remote(self, name: str, ref: str, path: Path | None, alias: str | None, pin: bool,
                    keep_alive: float | str | None, placement: str, hosts: tuple[str, ...], estimate: int,
                    make: Callable[[Callable[[str], None]], Any]) -> ModelInfo:
        """Add a pool entry served by another process: ``make(on_failure)`` builds its runner, ``start()`` starts it."""
        self._make_room(estimate, exclude=name)
        ka = self.keep_alive if keep_alive == "default" else keep_alive
        assert not isinstance(ka, str)
        with self._lock:
            self._models[name] = ModelInfo(name, alias, ref, path, "loading", estimate, time.time(), 0, pin, ka, None,
                                           store.describe(path).context_length if path else None,
                                           placement=placement, hosts=hosts)
        self._publish(ModelEvent(name, "loading", self._models[name]))

        def failed(message: str) -> None:  # the remote side died: its requests failed, the entry stays to tell why
            if name in self._models:
                self._set(name, state="failed", error=message)

        try:
            remote = make(failed)
            remote.start()
        except BaseException as e:
            self._set(name, state="failed", error=str(e))
            with self._lock:
                self._models.pop(name, None)
            raise
        self._remote[name] = remote
        self._set(name, state="ready", size_bytes=getattr(remote, "local_weight_bytes", 0) or estimate,
                  ranks=remote.ranks())
        return self._touch(name)

    # -- requests -------------------------------------------------------------------------------

    def _chat_tokens(self, runner: Runner, messages: Any, structure: dict | None = None) -> tuple[list[int], Plan]:
        """The prompt's tokens, and the plan of its tools and structure (see :mod:`.structured`)."""
        self._check_messages(messages)
        if not getattr(runner.tokenizer, "chat_template", None):
            raise InvalidParameterError(
                "model", f"model {runner.name!r} has no chat template: use complete() with a raw prompt")
        p = plan(runner.tokenizer, messages, **(structure or {}))
        tokens = runner.tokenizer.apply_chat_template(p.messages, tools=p.template_tools, add_generation_prompt=True)
        return list(tokens), p

    @staticmethod
    def _check_messages(messages: Any) -> None:
        """Raise InvalidParameterError naming the field unless ``messages`` is a valid conversation."""
        if not isinstance(messages, list) or not messages:
            raise InvalidParameterError("messages", "messages must be a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise InvalidParameterError(  # never the content
                    f"messages[{i}].role", f"messages[{i}].role must be one of {', '.join(ROLES)}, got "
                    f"{repr(m.get('role'))[:40] if isinstance(m, dict) else 'a ' + type(m).__name__}")
            calls = m.get("tool_calls") if m["role"] == "assistant" else None
            if calls is not None:
                _check_tool_calls(calls, f"messages[{i}].tool_calls")
            if not (calls and m.get("content") is None):
                _check_text(m.get("content"), f"messages[{i}].content", allow_empty=True)

    def _prompt_tokens(self, runner: Runner, prompt: Any) -> list[int]:
        _check_text(prompt, "prompt", allow_empty=False)
        return list(runner.tokenizer.encode(prompt))

    def count_tokens(self, messages: Any = None, model: str | None = None, prompt: str | None = None,
                     **structure: Any) -> int:
        """How many tokens a chat (or a raw prompt) takes with the model's template; ``structure``
        (``tools``, ``tool_choice``, ``response_format``...) as :meth:`chat` takes it, since tools are in the prompt."""
        info = self._chat_model(model)
        runner = self._runner(info.name)
        if runner.tokenizer is None:
            raise InvalidParameterError("model", f"model {info.name!r} is attached: its tokenizer is on its server")
        if prompt is not None:
            return len(self._prompt_tokens(runner, prompt))
        structure = {k: v for k, v in structure.items() if v is not None}
        return len(self._chat_tokens(runner, messages, structure)[0])

    async def acount_tokens(self, messages: Any = None, model: str | None = None, prompt: str | None = None,
                            **structure: Any) -> int:
        """:meth:`count_tokens` on a worker thread, never blocking the running event loop."""
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(self.count_tokens, messages, model, prompt, **structure))

    @staticmethod
    def _check_fits(info: ModelInfo, runner: Runner, kind: str, content: Any) -> None:
        """Refuse, before tokenizing it, a text too long for the context whatever its tokens."""
        ctx = info.context_length
        chars = len(content) if kind != "chat" else sum(
            len(m["content"]) for m in content if isinstance(m, dict) and isinstance(m.get("content"), str))
        at_least = chars // runner.max_token_chars
        if ctx is not None and at_least >= ctx:
            raise ContextLengthError("messages" if kind == "chat" else "prompt",
                                     f"This model's maximum context length is {ctx} tokens, and the prompt is too "
                                     f"long: at least {at_least} tokens ({info.name}).", at_least, ctx)

    def _chat_model(self, model: str | None) -> ModelInfo:
        info = self.find(model, kind="chat")
        if info.kind != "chat":
            raise InvalidParameterError(
                "model", f"model {info.alias or info.name!r} is an {info.kind} model: it cannot chat or complete; "
                f"use pool.embed() or /v1/embeddings")
        return info

    def _start(self, kind: str, content: Any, model: str | None, sink: Callable[[StreamEvent], None],
               meta: dict | None, timeout: float | None, params: dict) -> tuple[str, str, Request]:
        info = self._chat_model(model)
        runner = self._runner(info.name)
        params = dict(params)
        structure = {k: params.pop(k) for k in STRUCTURE if params.get(k) is not None} if kind == "chat" else {}
        p = fit_to_model(make_params(**params), runner.vocab_size)
        if isinstance(content, (str, list)):
            self._check_fits(info, runner, kind, content)
        chat_plan: Plan | None = None
        if structure and info.name in self._remote:  # a grammar matcher cannot cross to another process yet
            raise InvalidParameterError(next(iter(structure)), f"model {info.name!r} runs in other processes: tools "
                                        "and structured output need a model of this process")
        if runner.tokenizer is None:  # an attached server templates and tokenizes the request itself
            self._check_messages(content) if kind == "chat" else _check_text(content, "prompt", allow_empty=False)
            tokens: list[int] = []
        elif kind == "chat":
            tokens, chat_plan = self._chat_tokens(runner, content, structure)
        else:
            tokens = self._prompt_tokens(runner, content)
        ctx = info.context_length
        if ctx is not None:
            where = "messages" if kind == "chat" else "prompt"
            if len(tokens) >= ctx:
                raise ContextLengthError(where, f"This model's maximum context length is {ctx} tokens, and the "
                                                f"prompt is too long: {len(tokens)} tokens ({info.name}).",
                                         len(tokens), ctx)
            if params.get("max_tokens") is not None and len(tokens) + p.max_tokens > ctx:
                raise ContextLengthError(
                    "max_tokens", f"This model's maximum context length is {ctx} tokens, and max_tokens="
                    f"{p.max_tokens} plus the {len(tokens)}-token prompt exceeds it ({info.name}).",
                    len(tokens) + p.max_tokens, ctx)
            if params.get("max_tokens") is None:
                p = replace(p, max_tokens=min(DEFAULT_MAX_TOKENS, ctx - len(tokens)))
        meta = dict(meta or {})
        meta["audit"] = meta.get("audit") or self.audit
        request_id = meta.get("id") or new_request_id()
        started, started_at = time.time(), utc_now()
        text: list[str] = []
        parser = chat_plan.parser if chat_plan is not None else None
        parse = chat_plan.parse if chat_plan is not None and chat_plan.schema is not None else None
        structured = parser is not None or parse is not None
        constraint = chat_plan.constraint if chat_plan is not None else None

        def emit(event: Event) -> None:
            if isinstance(event, Delta):
                text.append(event.text)
                if parser is not None:  # content goes on as deltas, calls as their pieces, then whole
                    _send(parser.feed(event.text))
                    if parser.repeated:  # the model repeats a call: its turn is over
                        request.cancelled.set()
                    return
            elif isinstance(event, Done) and structured:
                if parser is not None:
                    _send(parser.finish())
                calls = list(parser.calls) if parser is not None else []
                parsed = parse("".join(text)) if parse is not None else None
                ended = event.finish_reason == "stop" or (parser is not None and parser.repeated)
                done = replace(event, finish_reason="tool_calls") if calls and ended else event
                final = Final(done, calls, parsed, constraint is not None)
                self._finished(info.name, request_id, started, started_at, kind, content, "".join(text), final, meta)
                sink(final)
                return
            elif isinstance(event, (Done, Failed)):
                self._finished(info.name, request_id, started, started_at, kind, content, "".join(text), event, meta,
                               constrained=constraint is not None)
            sink(event)

        def _send(items: list[ParsedItem]) -> None:
            for item in items:
                sink(Delta(item) if isinstance(item, str) else item)

        request = Request(info.name, tokens, p, emit, constraint=constraint,
                          deadline=time.perf_counter() + timeout if timeout else None)
        self._request_started(info.name, request_id, meta)
        if info.name in self._remote:
            self._remote[info.name].submit(request, content)
        else:
            self.engine.submit(request)
        return request_id, info.alias or info.name, request

    def _request_started(self, name: str, request_id: str, meta: dict) -> None:
        """Count a request in flight on ``name`` and tell subscribers (chat and embedding requests alike)."""
        with self._lock:
            self._in_flight[name] = self._in_flight.get(name, 0) + 1
            self._touch(name)
        self._publish(RequestEvent("start", {"id": request_id, "model": name, "source": meta.get("source", "api")}))

    def _request_ended(self, row: dict, meta: dict, content: dict | None) -> None:
        """A request on ``row["model"]`` ended: its audit row is published and recorded."""
        name = row["model"]
        with self._lock:
            self._in_flight[name] = self._in_flight.get(name, 1) - 1
            if name in self._models:
                self._touch(name)
        self._publish(RequestEvent("end", row))
        audit = meta.get("audit") or self.audit
        if audit is not None:
            audit.record(row, content)

    def _finished(self, name: str, request_id: str, started: float, started_at: str, kind: str, content: Any,
                  text: str, event: Done | Final | Failed, meta: dict, constrained: bool = False) -> None:
        calls: list[ToolCall] = []
        if isinstance(event, Final):
            calls, constrained, event = event.tool_calls, event.constrained, event.done
        if isinstance(event, Done):
            status = event.finish_reason if event.finish_reason in ("cancelled", "timeout") else "ok"
            outcome = dict(status=status, prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                           ttft=event.ttft, duration=event.duration, tokens_per_second=event.tokens_per_second,
                           finish_reason=event.finish_reason)
        else:
            outcome = dict(error_fields(event.error, meta, answered=meta.get("stream", False) and bool(text)),
                           duration=time.time() - started)
        outcome.update(tool_calls=len(calls), tool_names=",".join(c.name for c in calls) or None,
                       constrained=constrained)
        row = audit_row(request_id, started_at, kind, name, meta, outcome)
        self._request_ended(row, meta, {"prompt": content, "completion": text})

    def record_refused(self, error: BaseException, model: str | None, meta: dict | None, kind: str = "chat") -> None:
        """Record a request refused before it reached the engine (bad input, unknown model) in the audit log."""
        meta = meta or {}
        if model is None:  # the model the request would have gone to, so stats group it there
            with contextlib.suppress(ModelNotFoundError):
                model = self.find(None).name
        row = audit_row(meta.get("id") or new_request_id(), utc_now(), kind, model, meta, error_fields(error, meta))
        self._publish(RequestEvent("end", row))
        audit = meta.get("audit") or self.audit
        if audit is not None:
            audit.record(row)

    def _start_or_record(self, kind, content, model, sink, meta, timeout, params):
        try:
            return self._start(kind, content, model, sink, meta, timeout, params)
        except Exception as e:
            self.record_refused(e, model, meta, kind)
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
              timeout: float | None, params: dict) -> Awaitable[Result] | AsyncTextStream:
        loop = asyncio.get_running_loop()
        events, sink = async_sink(loop)
        meta = {"stream": stream, **(meta or {})}
        # templating and tokenizing take time proportional to the input: never on the event loop
        started = loop.run_in_executor(None, self._start_or_record, kind, content, model, sink, meta, timeout, params)
        s = AsyncTextStream(started, events)
        return s if stream else s.collect()

    @overload
    def chat(self, messages: list[dict], model: str | None = None, stream: Literal[False] = False, *,
             tools: list | None = None, tool_choice: str | dict | None = None, schema: Any = None,
             meta: dict | None = None, timeout: float | None = None, **params: Any) -> Result: ...

    @overload
    def chat(self, messages: list[dict], model: str | None = None, *, stream: Literal[True],
             tools: list | None = None, tool_choice: str | dict | None = None, schema: Any = None,
             meta: dict | None = None, timeout: float | None = None, **params: Any) -> TextStream: ...

    def chat(self, messages: list[dict], model: str | None = None, stream: bool = False, *,
             tools: list | None = None, tool_choice: str | dict | None = None, schema: Any = None,
             meta: dict | None = None, timeout: float | None = None, **params: Any) -> Result | TextStream:
        """Answer a conversation with the model's chat template.

        ``params``: temperature, top_p, top_k, min_p, repetition_penalty, seed, max_tokens, stop,
        and ``response_format`` (OpenAI's, instead of ``schema``) and ``parallel_tool_calls``.
        ``stream=True`` returns a :class:`TextStream` of deltas. ``meta`` holds audit fields
        (source, endpoint, protocol, id...). Bad input raises ValueError naming the field.

        ``tools``: Python functions, :class:`~mlx_manager_nb.tools.Tool` objects or OpenAI function-tool
        dicts; ``tool_choice``: "auto" (default), "none", "required" or ``{"name": ...}``. Calls come
        back in ``Result.tool_calls`` (finish_reason "tool_calls"). ``schema`` (a pydantic model class
        or a JSON schema dict) constrains the answer to matching JSON, parsed into ``Result.parsed``.
        Messages may hold assistant ``tool_calls`` and ``tool`` results in OpenAI's shape.
        """
        params.update(tools=tools, tool_choice=tool_choice, schema=schema)
        return self._run("chat", messages, model, stream, meta, timeout, params)

    def chain(self, messages: list[dict], tools: list, model: str | None = None, *, max_rounds: int = TOOL_ROUNDS,
              tool_choice: str | dict | None = None, **params: Any) -> tuple[Result, list[dict]]:
        """Answer with tools run in a loop (see :func:`mlx_manager_nb.chain.rounds`): each round the
        model's calls run (Python functions) and their results go back, until it answers in text;
        after ``max_rounds`` rounds of calls it must answer (tool_choice "none"). ``tool_choice``
        applies to the first round, later ones are "auto".

        Returns the final :class:`Result` and the transcript (``messages`` with the calls, the
        tool results and the answer). A failing function's error goes back to the model as its result.
        """
        tool_list = make_tools(tools)
        history = list(messages)
        *_, result = rounds(lambda m, choice: self.chat(m, model, tools=tool_list, tool_choice=choice, **params),
                            history, tool_list, tool_choice=tool_choice, max_rounds=max_rounds)
        history.append({"role": "assistant", "content": result.text})
        return result, history

    @overload
    def complete(self, prompt: str, model: str | None = None, stream: Literal[False] = False, *,
                 meta: dict | None = None, timeout: float | None = None, **params: Any) -> Result: ...

    @overload
    def complete(self, prompt: str, model: str | None = None, *, stream: Literal[True],
                 meta: dict | None = None, timeout: float | None = None, **params: Any) -> TextStream: ...

    def complete(self, prompt: str, model: str | None = None, stream: bool = False, *,
                 meta: dict | None = None, timeout: float | None = None, **params: Any) -> Result | TextStream:
        """Continue a raw prompt (no chat template)."""
        return self._run("complete", prompt, model, stream, meta, timeout, params)

    @overload
    def achat(self, messages: list[dict], model: str | None = None, stream: Literal[False] = False, *,
              tools: list | None = None, tool_choice: str | dict | None = None, schema: Any = None,
              meta: dict | None = None, timeout: float | None = None, **params: Any) -> Awaitable[Result]: ...

    @overload
    def achat(self, messages: list[dict], model: str | None = None, *, stream: Literal[True],
              tools: list | None = None, tool_choice: str | dict | None = None, schema: Any = None,
              meta: dict | None = None, timeout: float | None = None, **params: Any) -> AsyncTextStream: ...

    def achat(self, messages: list[dict], model: str | None = None, stream: bool = False, *,
              tools: list | None = None, tool_choice: str | dict | None = None, schema: Any = None,
              meta: dict | None = None, timeout: float | None = None,
              **params: Any) -> Awaitable[Result] | AsyncTextStream:
        """``await pool.achat(...)`` for a Result, ``async for d in pool.achat(..., stream=True)`` for deltas.

        Must be called from a running event loop, which it never blocks. Tools and schema as in :meth:`chat`.
        """
        params.update(tools=tools, tool_choice=tool_choice, schema=schema)
        return self._arun("chat", messages, model, stream, meta, timeout, params)

    @overload
    def acomplete(self, prompt: str, model: str | None = None, stream: Literal[False] = False, *,
                  meta: dict | None = None, timeout: float | None = None, **params: Any) -> Awaitable[Result]: ...

    @overload
    def acomplete(self, prompt: str, model: str | None = None, *, stream: Literal[True],
                  meta: dict | None = None, timeout: float | None = None, **params: Any) -> AsyncTextStream: ...

    def acomplete(self, prompt: str, model: str | None = None, stream: bool = False, *,
                  meta: dict | None = None, timeout: float | None = None,
                  **params: Any) -> Awaitable[Result] | AsyncTextStream:
        """:meth:`complete` from a running event loop: awaitable Result, or an async stream."""
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
        """Engine liveness, what is loaded, and memory: weights (memory_used), KV caches and MLX's figures."""
        error = self.engine.error
        return {
            "engine": "alive" if self.engine.alive else ("dead" if error else "idle"),
            "engine_error": repr(error) if error else None,
            "models": [m.alias or m.name for m in self.models() if m.state == "ready"],
            "memory_used": self.memory_used(),
            "max_memory": self.max_memory,
            **self.engine.memory(),  # kv_bytes, cache_bytes and MLX's active, cache and peak bytes
        }

    def close(self) -> None:
        """Unload every model, end the engine thread and flush the audit log; later use starts afresh."""
        for m in self.models():
            with contextlib.suppress(ModelNotFoundError):
                self.unload(m.name)
        self.engine.stop()
        if self.audit is not None:
            self.audit.flush()
