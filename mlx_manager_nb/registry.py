"""The model registry: load, unload, pin and evict models, keep-alive, and models served by other
processes (sharded over hosts, or attached from another server); and the one name resolver
(:meth:`Registry.lookup`). :class:`~mlx_manager_nb.model_pool.Pool` adds the requests.

One :class:`~mlx_manager_nb.engine.Engine` thread does all MLX work; the methods can be called from
any thread. A load reads the tokenizer and config on the caller's thread, then makes the model on the
engine thread as a sliced job (see :mod:`mlx_manager_nb.slices`): its weights are evaluated a few
tensors per slice, between the decode steps of running streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

# imported here, not lazily: transformers first imported on a worker thread leaves a C++ thread
# that aborts the process at exit ("terminate called...")
from mlx_lm.utils import dequantize_model, load_config, load_model, load_tokenizer

from . import attention, embeddings, kv_disk, kv_quant, store, vision
from .engine import Engine, Request, Runner
from .errors import EngineError, InvalidModelError, InvalidParameterError, ModelNotFoundError, PoolFullError
from .request import RequestContext
from .runner import RequestRecord
from .slices import Job


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
    disk_cache_bytes: int = 0  # its prompt cache's files on disk (see kv_disk)
    disk_hits: int = 0  # prompts that read a prefix's KV from those files, since it was loaded
    memory_hits: int = 0  # prompts that found a prefix's KV in the memory tier, since it was loaded
    prompt_lookups: int = 0  # prompts that looked for a cached prefix, since it was loaded
    kv_bits: int | None = None  # its KV caches are quantized to these bits (see kv_quant); None: full precision
    kind: str = "chat"  # "embedding" or "vision" (a chat model that also reads images, see vision)
    placement: str = "local"  # "local", "sharded" (ranks started by mlx.launch) or "attached" (an OpenAI server)
    hosts: tuple[str, ...] = ()  # a sharded model's hosts, rank by rank, or an attached model's base URL
    ranks: tuple[dict, ...] = ()  # a sharded model's per-rank state (see ShardedModel.ranks)
    auto_loaded: bool = False  # loaded by a client's request (the server's auto-load), not by the user

    @property
    def hit_rate(self) -> float | None:
        """The share of prompts that found a cached prefix, in memory or on disk (None before the first)."""
        return (self.memory_hits + self.disk_hits) / self.prompt_lookups if self.prompt_lookups else None


def _why_held(m: ModelInfo, auto: bool) -> str:
    if m.pinned:
        return "pinned"
    if m.in_flight:
        return f"{m.in_flight} in flight"
    return "loaded by the user: a client's request never evicts it" if auto and not m.auto_loaded else m.state


def _hits(counts: tuple[int, ...], disk: kv_disk.DiskTier | None) -> dict[str, Any]:
    """A model's prompt-cache counters from the engine's (lookups, hits in either tier) and its disk tier's
    hits: a prefix read from disk enters the memory tier before its request looks there."""
    lookups, hits = counts
    on_disk = disk.hits if disk is not None else 0
    return {"prompt_lookups": lookups, "memory_hits": max(0, hits - on_disk), "disk_hits": on_disk}


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _model_bytes(model: Any) -> int:
    flat: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    return sum(v.nbytes for _, v in flat)


def _read_tokenizer(path: Path) -> tuple[Any, int]:
    """A model folder's tokenizer, and its longest token's length in characters (any thread)."""
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=load_config(path).get("eos_token_id"))
        return tokenizer, max(map(len, tokenizer.vocab), default=1) or 1
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise InvalidModelError(f"cannot load {path}: {e}") from None


def _runner(name: str, model: Any, tokenizer: tuple[Any, int], dequantize: bool, **fields: Any) -> Runner:
    """A chat runner for ``model`` (on the engine thread): tiled attention installed, quantized layers made
    float32 when ``dequantize``."""
    attention.install()  # tiled attention for long prompts on CPUs, once its model module is imported
    if dequantize:
        model = dequantize_model(model)
        model.set_dtype(mx.float32)
    return Runner(name, model, tokenizer[0], max_token_chars=tokenizer[1], **fields)


def _prepare_chat(name: str, path: Path, dequantize: bool) -> Callable[[], Runner]:
    """Read a chat model's tokenizer and check its template (any thread); the function returned makes its
    runner with the weights read lazily (on the engine thread).

    ``dequantize`` turns quantized layers into float32 ones: on CPUs, MLX's quantized kernels are
    slow and do not speed up with batching, while float32 matmuls go through an optimized BLAS.
    """
    tokenizer = _read_tokenizer(path)
    if getattr(tokenizer[0], "chat_template", None):
        try:  # a template that cannot render would fail every chat request: refuse the model now
            tokenizer[0].apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
        except Exception as e:
            raise InvalidModelError(f"model {name!r}: its chat template does not render "
                                    f"({type(e).__name__}: {str(e)[:200]})") from None
    return lambda: _runner(name, load_model(path, lazy=True)[0], tokenizer, dequantize)


def _prepare_vision(name: str, path: Path, dequantize: bool, splitting: bool) -> Callable[[], Runner]:
    """Read a vision model's tokenizer and processor, checking its template (any thread); the function returned
    makes its runner with the weights read lazily (on the engine thread). ``splitting``: see vision.read_processor."""
    tokenizer = _read_tokenizer(path)
    processor = vision.read_processor(path, splitting)
    config = store.read_config(path)

    def build() -> Runner:
        model = vision.build(path, config)
        if mx.default_device().type == mx.DeviceType.cpu:  # a bfloat16 tile took over 70 s on a CPU, float32 13
            model.vision.set_dtype(mx.float32)
        return _runner(name, model, tokenizer, dequantize, processor=processor)

    return build


def _load_job(build: Callable[[], Runner], path: Path, progress: Callable[[str, float], None],
              done: Future) -> Job:
    """Make a runner with ``build``, then evaluate its weights as many tensors per slice as the slice's time
    allows, reporting progress; ``done`` gets the runner (an engine job)."""
    try:
        budget = yield
        runner = build()
        params = tree_flatten(runner.model.parameters())
        start = time.perf_counter()
        for i, (_, v) in enumerate(params):
            if time.perf_counter() - start >= budget:
                progress("loading weights", 0.1 + 0.85 * i / len(params))
                budget = yield
                start = time.perf_counter()
            mx.eval(v)
    except GeneratorExit:
        done.set_exception(EngineError("the engine stopped during the load"))
        raise
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        done.set_exception(InvalidModelError(f"cannot load {path}: {e}"))
    except BaseException as e:
        done.set_exception(e)
    else:
        done.set_result(runner)


class Registry:
    """Models loaded in this process, shared by the notebook, the widgets and the HTTP server.

    ``max_models`` and ``max_memory`` (bytes) bound the pool: loading past them evicts the least
    recently used idle, unpinned model. ``keep_alive`` (seconds, None for ever) unloads models
    left idle that long. ``dequantize`` loads quantized models as float32: None (the default) does
    so on CPU devices when the float weights fit in ``max_memory``. ``audit`` is an
    :class:`~mlx_manager_nb.audit_log.AuditLog` or None. ``kv_disk_bytes`` bounds the prompt cache's
    files under ``$MLX_NB_HOME/kv/`` (see :mod:`~mlx_manager_nb.kv_disk`); 0 keeps it in memory only.
    ``image_splitting`` (an attribute, read when a vision model loads): whether it cuts images larger than a
    tile into tiles (see :mod:`~mlx_manager_nb.vision`); None, on GPUs only.
    """

    def __init__(
        self,
        max_models: int = 4,
        max_memory: int | None = None,
        keep_alive: float | None = 1800.0,
        audit: Any = None,
        dequantize: bool | None = None,
        kv_disk_bytes: int = kv_disk.KV_DISK_BYTES,
    ):
        self.max_models = max_models
        self.max_memory = max_memory if max_memory is not None else int(physical_memory() * 0.5)
        self.keep_alive = keep_alive
        self.audit = audit
        self.dequantize = dequantize
        self.kv_disk_bytes = kv_disk_bytes
        self.image_splitting: bool | None = None  # None: on GPUs only (a 512-pixel tile takes seconds on a CPU)
        self._disks: dict[str, kv_disk.DiskTier] = {}  # each chat model's disk tier, while it is loaded
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
        disks = dict(self._disks)
        return [replace(i, in_flight=self._in_flight.get(i.name, 0), kv_bytes=memory.get(i.name, (0, 0, 0, 0))[0],
                        cache_bytes=memory.get(i.name, (0, 0, 0, 0))[1],
                        disk_cache_bytes=disks[i.name].nbytes if i.name in disks else 0,
                        **_hits(memory.get(i.name, (0, 0, 0, 0))[2:], disks.get(i.name)),
                        ranks=self._remote[i.name].ranks() if i.name in self._remote else i.ranks) for i in infos]

    def memory_used(self) -> int:
        """Bytes the pool's models hold: weights, KV caches of running requests and prompt caches."""
        return sum(m.size_bytes + m.kv_bytes + m.cache_bytes for m in self.models() if m.state in ("ready", "loading"))

    def lookup(self, model: str | None, kind: str | None = None, ready: bool = True) -> ModelInfo | None:
        """The one name resolver: the model a name, alias, reference or named reference (``demo``, see
        :func:`mlx_manager_nb.store.register`) stands for, among ready models (``ready=False``: any state);
        None: the default, else the last used ready model of ``kind``."""
        with self._lock:
            models = [m for m in self._models.values() if not ready or m.state == "ready"]
            if model is None:
                model = self.default
                if model is None:
                    of_kind = [m for m in models if kind in (None, m.kind) or (kind, m.kind) == ("chat", "vision")]
                    return max(of_kind, key=lambda m: m.last_used) if of_kind else None
            names = {model, store.named_folder(model)} - {None}
            return next((m for m in models if names & {m.name, m.alias, m.ref}), None)

    def find(self, model: str | None, kind: str | None = None) -> ModelInfo:
        """The loaded model a name, alias or reference stands for; None: the default, else the last used of ``kind``."""
        info = self.lookup(model, kind)
        if info is not None:
            return info
        if model is None and self.default is None:
            raise ModelNotFoundError("No model is loaded. Load one first, e.g. pool.load('demo').")
        loaded = ", ".join(m.alias or m.name for m in self.models() if m.state == "ready") or "none"
        local = ", ".join(m.name for m in store.list_local_models()) or "none"
        raise ModelNotFoundError(f"Model {model or self.default!r} is not loaded. Loaded: {loaded}. "
                                 f"Available to load: {local}.")

    def is_loaded(self, model: str) -> bool:
        return self.lookup(model) is not None

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
        auto_loaded: bool = False,
        kv_bits: int | None = None,
        draft: str | os.PathLike | None = None,
    ) -> ModelInfo:
        """Load a model (see :func:`mlx_manager_nb.store.resolve` for references); return its info.

        A model already loaded is returned as is; two concurrent loads of the same model load it once.
        ``auto_loaded``: a client's request loads it (the server's auto-load); making room for it
        evicts only other auto-loaded models, never one the user loaded, and a load by the user
        makes it the user's.
        ``hosts`` (or an mlx.launch ``hostfile``) shards it over one rank per host with ``mx.distributed``
        (``backend``: ring, jaccl, jaccl-ring or mpi; ``parallel``: "tensor" or "pipeline"), served by
        :mod:`mlx_manager_nb.distributed`; e.g. ``hosts=["127.0.0.1", "127.0.0.1"]``.
        ``kv_bits`` (4 or 8) quantizes its KV caches, running and cached, in memory and on disk (see
        :mod:`mlx_manager_nb.kv_quant`): about 2x (8) or 3.5x (4) less KV memory, for a small quality cost.
        ``draft``: a smaller model of the same vocabulary (a reference, as ``ref``) that drafts tokens for this
        one's speculative decoding (see :mod:`mlx_manager_nb.speculative`), loaded as it is (not dequantized),
        counted in this model's memory and unloaded with it; another vocabulary is refused.
        """
        ref = str(ref)
        if kv_bits is not None and (kv_bits not in kv_quant.KV_BITS or hosts or hostfile):
            raise InvalidParameterError("kv_bits", f"kv_bits must be 4 or 8 for a model of this process, "
                                                   f"got {kv_bits!r}")
        if draft is not None and (hosts or hostfile):
            raise InvalidParameterError("draft", "draft: a sharded model cannot have a draft model")
        if hosts or hostfile:
            return self._load_sharded(ref, alias, pin, keep_alive, progress, list(hosts or []), backend, parallel,
                                      hostfile)
        m = self.lookup(ref)
        if m is not None and m.placement == "local":
            if kv_bits is not None and kv_bits != m.kv_bits:
                raise InvalidParameterError("kv_bits", f"{m.alias or m.name} is loaded with kv_bits={m.kv_bits}: "
                                                       f"unload it to load it with kv_bits={kv_bits}")
            return self._touch(m.name, alias=alias or m.alias, pinned=m.pinned or pin,
                               auto_loaded=m.auto_loaded and auto_loaded)
        report = self._progress_reporter(ref, progress)
        path = store.resolve(ref, report)
        name = store.model_name(ref, path)
        with self._lock:
            waiting = self._loading.get(name)
            if waiting is None:
                fut = self._loading[name] = Future()
        if waiting is not None:
            info = waiting.result()
            return info if auto_loaded or not info.auto_loaded else self._touch(info.name, auto_loaded=False)
        try:
            info = self._load_new(name, ref, path, alias, pin, keep_alive, report, auto_loaded, kv_bits, draft)
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

    def _load_new(self, name, ref, path, alias, pin, keep_alive, report, auto_loaded, kv_bits, draft) -> ModelInfo:
        if name in self._models and self._models[name].state == "ready":
            held = self._models[name]
            return self._touch(name, alias=alias or held.alias, pinned=pin or held.pinned,
                               auto_loaded=held.auto_loaded and auto_loaded)
        config = store.describe(path)
        kind = "vision" if vision.is_vision(path) else embeddings.model_kind(path)
        context = embeddings.max_length(path) if kind == "embedding" else config.context_length
        if kv_bits is not None and kind == "embedding":
            raise InvalidParameterError("kv_bits", f"kv_bits: {name} is an embedding model, it keeps no KV cache")
        if draft is not None and kind != "chat":
            raise InvalidParameterError("draft", f"draft: {name} is not a text model ({kind}): only a text model "
                                                 "takes a draft")
        disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        dequantize, estimate = self._dequantize_plan(path, disk, name)
        draft_path = store.resolve(str(draft), report) if draft is not None else None
        if draft_path is not None:
            estimate += sum(f.stat().st_size for f in draft_path.glob("*.safetensors"))
        self._make_room(estimate, exclude=name, auto=auto_loaded)
        ka = self.keep_alive if keep_alive == "default" else keep_alive
        with self._lock:
            self._models[name] = ModelInfo(name, alias, ref, path, "loading", estimate, time.time(), 0, pin, ka,
                                           None, context, kind=kind, auto_loaded=auto_loaded, kv_bits=kv_bits)
        self._publish(ModelEvent(name, "loading", self._models[name]))
        report("loading weights", 0.0)
        try:
            build = embeddings.prepare(name, path) if kind == "embedding" else \
                _prepare_vision(name, path, dequantize, self._splitting()) if kind == "vision" else \
                _prepare_chat(name, path, dequantize)
            loaded: Future = Future()
            self.engine.add_job(_load_job(build, path, report, loaded))
            runner = loaded.result()
            if draft_path is not None:
                runner.draft = self._load_draft(runner, draft_path, report)
            runner.kv_budget = self.max_memory // self.max_models  # each model's share for KV caches
            if kv_bits is not None:  # refused where the model's caches or heads cannot be quantized
                runner.kv_group = self.engine.run(kv_quant.group_size, runner.model, kv_bits).result()
                runner.kv_bits = kv_bits
            disk = kv_disk.open_tier(path, self.kv_disk_bytes, kv_bits) if kind != "embedding" else None
            if disk is not None:
                runner.disk = self._disks[name] = disk
            self.engine.run(self.engine.add_runner, runner).result()
        except BaseException as e:
            self._set(name, state="failed", error=str(e))
            with self._lock:
                self._models.pop(name, None)
            raise
        report("ready", 1.0)
        size = _model_bytes(runner.model) + (_model_bytes(runner.draft) if runner.draft is not None else 0)
        self._set(name, state="ready", size_bytes=size)
        return self._touch(name)

    def _splitting(self) -> bool:
        """Whether vision models loaded now cut large images into tiles (see ``image_splitting``)."""
        if self.image_splitting is not None:
            return self.image_splitting
        return mx.default_device().type != mx.DeviceType.cpu

    def _load_draft(self, runner: Runner, path: Path, report: Callable[[str, float], None]) -> Any:
        """The draft model at ``path`` for ``runner``'s: refused unless its tokenizer's vocabulary is the same."""
        build = _prepare_chat(path.name, path, False)
        loaded: Future = Future()
        self.engine.add_job(_load_job(build, path, report, loaded))
        draft = loaded.result()
        if draft.tokenizer.vocab != runner.tokenizer.vocab or draft.vocab_size != runner.vocab_size:
            raise InvalidParameterError("draft", f"draft: {path.name} has another vocabulary than {runner.name} "
                                                 f"({len(draft.tokenizer.vocab)} tokens, {draft.vocab_size} logits "
                                                 f"against {len(runner.tokenizer.vocab)}, {runner.vocab_size}): a "
                                                 "draft model must share its model's tokenizer")
        return draft.model

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

    def _make_room(self, needed: int, exclude: str, auto: bool = False) -> None:
        """Evict idle, unpinned models until `needed` more bytes and one more model fit: auto-loaded ones
        first, least recently used first. ``auto``: room for a client's auto-load, which evicts only
        auto-loaded models (the user's stay)."""
        while True:
            with self._lock:
                live = [m for m in self.models() if m.state in ("ready", "loading") and m.name != exclude]
                too_many = len(live) >= self.max_models
                too_big = sum(m.size_bytes for m in live) + needed > self.max_memory
                if not (too_many or too_big):
                    return
                idle = [m for m in live if m.state == "ready" and not m.pinned and m.in_flight == 0
                        and (m.auto_loaded or not auto)]
                if not idle:
                    holders = ", ".join(f"{m.name} ({_why_held(m, auto)}, {m.size_bytes / 2**20:.0f} MiB)"
                                        for m in live)
                    limit = (f"max_models={self.max_models}" if too_many
                             else f"max_memory={self.max_memory / 2**20:.0f} MiB, {needed / 2**20:.0f} MiB needed")
                    hint = " (a request may name one of them instead)" if auto else ""
                    raise PoolFullError(f"Pool full ({limit}) and nothing can be evicted: {holders}{hint}")
                victim = min(idle, key=lambda m: (not m.auto_loaded, m.last_used))
                self._set(victim.name, state="unloading")
            self.engine.run(self._unload_on_engine, victim.name).result()
            self._close_disk(victim.name)

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

    def _close_disk(self, name: str) -> None:
        """Finish an unloaded model's disk writes (off the engine thread)."""
        disk = self._disks.pop(name, None)
        if disk is not None:
            disk.close()

    def unload(self, name: str) -> None:
        """Unload a model (by name or alias); requests still running on it fail."""
        info = self._get(name)
        self._set(info.name, state="unloading")
        self.engine.run(self._unload_on_engine, info.name).result()
        self._close_disk(info.name)
        if self.audit is not None:
            self.audit.flush()

    def _get(self, name: str) -> ModelInfo:
        info = self.lookup(name, ready=False)
        if info is None:
            present = ", ".join(self._models) or "none"
            raise ModelNotFoundError(f"Model {name!r} is not in the pool. In the pool: {present}.")
        return info

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

    def runner(self, name: str) -> Any:
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
        if self.lookup(name) is not None:
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

    # -- requests in flight (one lifecycle for chat, completion and embedding requests) -------

    def begin(self, kind: str, name: str, context: RequestContext) -> RequestRecord:
        """Count a request in flight on model ``name`` and tell subscribers; end it with ``RequestRecord.end``."""
        record = RequestRecord(self, kind, name, context)
        with self._lock:
            self._in_flight[name] = self._in_flight.get(name, 0) + 1
            self._touch(name)
        self._publish(RequestEvent("start", {"id": record.id, "model": name, "source": context.source}))
        return record

    def request_ended(self, row: dict, context: RequestContext, content: dict | None, counted: bool = True) -> None:
        """A request ended (``counted``: it was in flight): its audit row is published and recorded."""
        name = row["model"]
        if counted:
            with self._lock:
                self._in_flight[name] = self._in_flight.get(name, 1) - 1
                if name in self._models:
                    self._touch(name)
        self._publish(RequestEvent("end", row))
        audit = context.audit or self.audit
        if audit is not None:
            audit.record(row, content)

    def submit(self, request: Request, content: Any) -> None:
        """Hand a checked, tokenized request to what serves its model."""
        remote = self._remote.get(request.model)
        if remote is not None:
            remote.submit(request, content)
        else:
            self.engine.submit(request)

