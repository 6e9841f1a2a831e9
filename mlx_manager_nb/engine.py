"""The inference engine: one thread owns all MLX work, with continuous batching per model.

Requests go in with :meth:`Engine.submit`; each one's events (``Delta``, then ``Done`` or
``Failed``) come out through the request's ``emit`` callable, called on the engine thread.
Consumers hop to their own thread or loop (see :mod:`mlx_manager_nb.streams`).
Other MLX work (loading, unloading) runs on the same thread through :meth:`Engine.run`, and longer
work in slices between decode steps through :meth:`Engine.add_job` (see :mod:`mlx_manager_nb.slices`):
a prompt longer than :data:`PREFILL_THRESHOLD` uncached tokens (:data:`BUSY_PREFILL_THRESHOLD` while
the model decodes others) is prefilled that way, in chunks sized to a slice, then joins the batch
with its KV cache, so running streams keep their pace meanwhile.
Requests of a higher ``priority`` (the notebook's) wait ahead of others and prefill first.
A model's one decoding sequence leaves the batch to be decoded speculatively, a step per round, once
tokens can be drafted for it, and rejoins the batch when another request joins (see
:mod:`mlx_manager_nb.speculative`).

Memory: a runner's ``kv_budget`` bounds the bytes of its KV caches, those of the sequences it
decodes plus its prompt cache. A request joins the batch only when the batch's estimated KV
(sequences x the longest one's prompt + max_tokens, see :func:`_kv_slots`) still fits;
otherwise it waits in the runner's queue until sequences finish. A request is always admitted when
its model decodes (or prefills) nothing else, so one larger than the budget still runs, alone. The prompt cache
gets what the running sequences leave. When the engine goes idle it hands MLX's buffer cache back, and
makes a newly loaded model's one-time measurements (see :meth:`Engine._prepare`).

Backpressure: a request whose consumer leaves :data:`UNREAD_EVENTS` of its events untaken (a
stream nobody iterates, an HTTP client that stops reading) leaves the batch, its KV kept in the
prompt cache (within the budget, or dropped), and is parked (see :meth:`Engine._park`). It rejoins
the batch once its consumer has taken most of them, as a prompt of its tokens so far with what is
left of ``max_tokens``, its text, stop strings, sampler and grammar state kept; greedy decoding
gives the same text as without the pause. Parked longer than ``unread_timeout`` seconds, it is
cancelled (its ``Done.cause`` is ``"unread"``). A sequence whose grammar mask was late for a step (see
:class:`~mlx_manager_nb.constraints.Constraint`) is parked the same way until the mask is ready.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import KVCache, LRUPromptCache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

from . import blas, constraints, speculative, vision
from .attention import PREFILL_CHUNK
from .errors import EngineError, InvalidParameterError, ModelNotFoundError
from .kv_disk import DiskTier, cache_layers
from .kv_quant import make_cache
from .logprobs import Recorder, TokenLogprob, token_bytes
from .params import GenParams, Processor, make_processors, make_sampler
from .shared_prefix import fork, pick_source, shared_length
from .slices import Job, Slices, pause
from .stops import StopMatcher

if TYPE_CHECKING:
    from .constraints import Constraint

PROMPT_CACHE_ENTRIES = 16
UNREAD_EVENTS = 16  # events a consumer may leave untaken before its request stops being decoded
UNREAD_TIMEOUT = 60.0  # seconds a request may stay parked unread before it is cancelled
PARKED_POLL = 0.02  # seconds between looks at parked requests' consumers while nothing else runs
MLX_CACHE_LIMIT = 1 << 30  # bytes of freed buffers MLX may keep for reuse while decoding
PREFILL_THRESHOLD = 64  # uncached prompt tokens beyond which a prompt is prefilled in slices
MIN_CHUNK = 4  # prompt tokens of a sliced prefill's first piece, and the fewest of any; later ones fit their slice
# ... and beyond which while the model decodes others: ten 40-token prompts admitted at once made a
# running stream wait for all of them in one batch step (929 ms, 13x its quiet gap, on the demo model)
BUSY_PREFILL_THRESHOLD = MIN_CHUNK
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


class _Stop(Exception):
    """Asks the engine thread to end."""


@dataclass
class Delta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens this text came from, when the request asked


@dataclass
class Done:
    finish_reason: str  # "stop", "length", "cancelled" or "timeout"
    stop: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft: float | None
    duration: float
    cause: str | None = None  # why a "cancelled" one was cut: None, by its consumer; else Request.cause

    @property
    def tokens_per_second(self) -> float | None:
        if self.ttft is None or self.completion_tokens < 2 or self.duration <= self.ttft:
            return None
        return (self.completion_tokens - 1) / (self.duration - self.ttft)


@dataclass
class Failed:
    error: BaseException


Event = Delta | Done | Failed


@dataclass
class Request:
    """One generation: the prompt's token ids, its parameters and where its events go."""

    model: str
    prompt: list[int]
    params: GenParams
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    deadline: float | None = None  # perf_counter time after which it ends as "timeout"
    constraint: Constraint | None = None  # a grammar: a logits processor, and the sampler's mask
    backlog: Callable[[], int] | None = None  # its events not yet taken by its consumer (None: never parked)
    cause: str | None = None  # set before ``cancelled`` when the server cuts it: "shutdown" or "unread"
    priority: int = 0  # higher waits ahead and prefills first (see request.NOTEBOOK_PRIORITY)
    keep: bool = False  # its KV goes to the prompt cache's disk tier whatever its length (a warm-up)
    progress: Callable[[int, int], None] | None = None  # told (tokens prefilled, prompt tokens) after each chunk
    images: vision.ImagePrompt | None = None  # an image request's tiles and real ids; ``prompt`` holds keys there
    client: str | None = None  # who asked (an HTTP client's address; None: the notebook): see slices' shares


@dataclass
class _Seq:
    request: Request
    detok: Any
    stops: StopMatcher
    cached: int
    faults: list[BaseException]  # what its sampler or logits processors raised, if anything
    slots: int  # KV positions reserved for it (see _kv_slots)
    sampler: Callable[[mx.array], mx.array] = greedy_sampler
    processors: list[Processor] = field(default_factory=list)
    tokens: int = 0
    first: float | None = None
    recorder: Recorder | None = None  # when the request asked for log-probabilities
    pending: list[TokenLogprob] = field(default_factory=list)  # theirs, for tokens whose text is not out yet
    drafter: speculative.Lookup | speculative.DraftModel | None = None  # its drafts, once it may speculate


@dataclass
class _Token:
    """A token of a speculative step, as the batch's responses report one (see Engine._solo_step)."""

    uid: int
    token: int
    finish_reason: str | None
    all_tokens: list[int] | None  # when it ends the sequence: the tokens its KV cache holds, and that cache
    prompt_cache: list[Any] | None


@dataclass(eq=False)
class _Prefill:
    """A request whose prompt is being prefilled in slices: its KV cache so far covers ``prompt[:done]``."""

    request: Request
    slots: int
    cache: list[Any]
    done: int
    cached: int  # of those, the tokens the prompt cache (or another request's prefill) gave
    source: _Prefill | None = None  # the prefill it waits for, to take a copy of its KV at ``until`` tokens
    until: int = 0


@dataclass
class _Parked:
    """A sequence out of the batch while its consumer catches up (see :meth:`Engine._park`)."""

    seq: _Seq
    tokens: list[int]  # its prompt and the tokens generated so far (their KV went to the prompt cache)
    since: float  # time.monotonic() when it was parked


@dataclass
class Runner:
    """A loaded model as the engine holds it: weights, tokenizer, its batch and its prompt cache."""

    name: str
    model: Any
    tokenizer: Any
    gen: BatchGenerator | None = None
    prompt_cache: LRUPromptCache = field(default_factory=lambda: LRUPromptCache(PROMPT_CACHE_ENTRIES))
    active: dict[int, _Seq] = field(default_factory=dict)
    max_token_chars: int = 1  # the longest token's text: a prompt of N characters is at least N / this tokens
    waiting: deque[Request] = field(default_factory=deque)  # submitted, not yet admitted into the batch
    parked: list[_Parked] = field(default_factory=list)  # out of the batch until their consumers read
    kv_budget: int | None = None  # bytes for KV caches (running sequences and prompt cache); None: unbounded
    kv_bytes: int = 0  # KV cache bytes of the running sequences, as of the last step
    cache_bytes: int = 0  # bytes held by the prompt cache, as of the last step
    token_bytes: int | None = None  # KV bytes per token position, measured on first use
    embed_queue: Any = None  # an embedding model's jobs waiting for a forward pass (see embeddings)
    prefilling: list[_Prefill] = field(default_factory=list)  # admitted, prompt still being prefilled
    disk: DiskTier | None = None  # the prompt cache's disk tier (see kv_disk); None: memory only
    loading: list[Request] = field(default_factory=list)  # waiting for their prefix's KV to be read from disk
    kv_bits: int | None = None  # quantized KV caches (see kv_quant); None: the model's dtype
    kv_group: int | None = None  # their quantization group
    lookups: int = 0  # prompts admitted, each looking for a cached prefix
    hits: int = 0  # of those, the prompts that found one
    processor: vision.Processor | None = None  # a vision model's prompt maker (see vision)
    solo: speculative.Solo | None = None  # its one sequence, decoded outside the batch, speculatively
    draft: Any = None  # a smaller model of the same tokenizer that drafts for it (see speculative.DraftModel)
    drafted: int = 0  # tokens its speculative steps drafted...
    accepted: int = 0  # ...and of those, the tokens the model agreed with

    def new_cache(self) -> list[Any]:
        """An empty KV cache for one sequence (quantized where ``kv_bits`` is set)."""
        return make_cache(self.model, self.kv_bits, self.kv_group)

    @property
    def vocab_size(self) -> int:
        """The width of the model's logits: the bound for token ids and ``top_k``."""
        args = getattr(self.model, "args", None)
        for source in (args, getattr(args, "text_config", None)):
            size = source.get("vocab_size") if isinstance(source, dict) else getattr(source, "vocab_size", None)
            if size:
                return size
        return len(self.tokenizer.vocab)

    def batch(self) -> BatchGenerator:
        if self.gen is None:
            self.gen = BatchGenerator(self.model, completion_batch_size=32, prefill_batch_size=8,
                                      prefill_step_size=PREFILL_CHUNK)
        return self.gen

    def fail_active(self, error: BaseException) -> None:
        """Fail the running requests and free the batch; prefilling and waiting ones stay (engine thread)."""
        for seq in self.active.values():
            seq.request.cancelled.set()
            _emit(seq.request, Failed(error))
        self.active.clear()
        self.gen = None
        self.solo = None
        self.kv_bytes = 0

    def drop(self, error: BaseException) -> None:
        """Fail every request of this runner (running, prefilling, waiting, parked), free its batch (engine thread)."""
        self.fail_active(error)
        for request in [*(p.request for p in self.prefilling), *self.waiting, *(p.seq.request for p in self.parked),
                        *self.loading]:
            _emit(request, Failed(error))
        self.prefilling.clear()
        self.waiting.clear()
        self.parked.clear()
        self.loading.clear()


class Engine:
    """The single thread that runs every MLX operation of a pool."""

    def __init__(self, on_tick: Callable[[], None] | None = None, tick_seconds: float = 1.0):
        self._runners: dict[str, Runner] = {}
        self.unread_events = UNREAD_EVENTS  # see the module's docstring: backpressure
        self.unread_timeout = UNREAD_TIMEOUT
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._on_tick = on_tick
        self._tick_seconds = tick_seconds
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._slices = Slices()
        self._idle: deque[Callable[[], Any]] = deque()  # run once nothing decodes, prefills or waits
        self._sliced = False  # prefill in slices: only when this engine runs its own loop (not in lockstep)
        _engines.add(self)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if not self.alive:
                self._thread = threading.Thread(target=self._main, name="mlx-engine", daemon=True)
                self._thread.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run ``fn(*args)`` on the engine thread; the future holds its result."""
        fut: Future = Future()
        self._ensure_thread()
        self._inbox.put(("call", fn, args, fut))
        return fut

    def add_job(self, job: Job, priority: int = 0) -> None:
        """Run ``job`` in slices between decode steps (see :mod:`mlx_manager_nb.slices`)."""
        self._ensure_thread()
        self._inbox.put(("job", job, priority))

    def stop(self, timeout: float = 10.0) -> None:
        """End the engine thread after the work queued before this call; requests still running end as
        cancelled. A later call restarts it."""
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(("stop",))
            self._thread.join(timeout)

    def runner(self, name: str) -> Runner:
        """The loaded model ``name`` (its tokenizer is safe to use from any thread)."""
        runner = self._runners.get(name)
        if runner is None:
            raise ModelNotFoundError(f"model {name!r} is not loaded")
        return runner

    def add_runner(self, runner: Runner) -> None:
        """Serve a loaded model (call on the engine thread, e.g. inside :meth:`run`)."""
        self._runners[runner.name] = runner
        if runner.embed_queue is None:
            self._idle.append(functools.partial(self._prepare, weakref.ref(runner)))
        if runner.disk is not None:  # what leaves the memory tier long enough is on disk (see _on_evict)
            _on_evict(runner.prompt_cache, lambda tokens, cache: self._save(runner, tokens, cache))

    def _prepare(self, ref: weakref.ref[Runner]) -> None:
        """A text model's one-time measurements, made once the engine is idle after its load, which its first
        requests would otherwise make beside running streams: its KV bytes a token (a forward pass) and
        llguidance's view of its tokenizer (grammars and log-probabilities need it: converting the demo
        model's 49,152 tokens holds the GIL for 0.2 s, a stall of every stream's step)."""
        runner = ref()
        if runner is None or self._runners.get(runner.name) is not runner:  # unloaded meanwhile
            return
        if runner.token_bytes is None:
            runner.token_bytes = _kv_bytes_per_token(runner)
        constraints.ll_tokenizer(runner.tokenizer)

    def remove_runner(self, name: str, error: BaseException) -> None:
        """Stop serving ``name``: its requests fail with ``error`` (call on the engine thread)."""
        runner = self._runners.pop(name, None)
        if runner is not None:
            if runner.disk is not None:
                runner.disk.finish_copies()
            runner.drop(error)
        mx.clear_cache()

    def submit(self, request: Request) -> None:
        """Queue a request; it joins its model's running batch at the next step its KV budget allows."""
        self._ensure_thread()
        self._inbox.put(("submit", request))

    def memory(self) -> dict[str, int]:
        """Bytes in KV caches of running sequences, in prompt caches, and MLX's own figures."""
        runners = list(self._runners.values())
        return {
            "kv_bytes": sum(r.kv_bytes for r in runners),
            "cache_bytes": sum(r.cache_bytes for r in runners),
            "mlx_active_bytes": mx.get_active_memory(),
            "mlx_cache_bytes": mx.get_cache_memory(),
            "mlx_peak_bytes": mx.get_peak_memory(),
        }

    def model_memory(self) -> dict[str, tuple[int, int, int, int]]:
        """Per model: KV cache bytes of its running sequences, bytes in its prompt cache, prompts that looked
        there and those that found a prefix."""
        return {name: (r.kv_bytes, r.cache_bytes, r.lookups, r.hits) for name, r in list(self._runners.items())}

    # -- the engine thread -------------------------------------------------------------------

    def _main(self) -> None:
        self.error = None
        next_tick = time.monotonic() + self._tick_seconds
        mx.set_cache_limit(MLX_CACHE_LIMIT)
        self._sliced = True
        was_busy = False
        try:
            while True:
                busy = bool(self._slices) or any(r.active or r.waiting or r.prefilling for r in self._runners.values())
                if was_busy and not busy:  # the last sequence finished: give MLX's spare buffers back
                    mx.clear_cache()
                    _return_freed_memory()
                was_busy = busy
                if not busy and self._idle:
                    with contextlib.suppress(Exception):
                        self._idle.popleft()()
                wait = 0 if busy or self._idle else max(0.0, next_tick - time.monotonic())
                if not busy and any(r.parked for r in self._runners.values()):
                    wait = min(wait, PARKED_POLL)
                self._drain(wait)
                self._advance_all()
                if self._on_tick and time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self._tick_seconds
                    self._on_tick()
        except _Stop:  # requests still running or waiting end as cancelled
            for runner in self._runners.values():
                for seq in runner.active.values():
                    _emit(seq.request, self._seq_done(seq, "cancelled"))
                for request in [*runner.waiting, *(p.request for p in runner.prefilling), *runner.loading]:
                    _emit(request, _done(request, "cancelled", None, 0, 0, None))
                for parked in runner.parked:
                    _emit(parked.seq.request, self._seq_done(parked.seq, "cancelled"))
                runner.active.clear()
                runner.waiting.clear()
                runner.parked.clear()
                runner.prefilling.clear()
                runner.loading.clear()
                if runner.disk is not None:  # what finished before the stop still reaches the disk
                    runner.disk.finish_copies()
                runner.gen = None
                runner.solo = None
                runner.kv_bytes = 0
        except BaseException as e:  # the thread is dying: say so to everyone waiting on it
            self.error = e
            dead = EngineError(f"the engine thread died: {e!r}")
            for runner in self._runners.values():
                runner.drop(dead)
            while True:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item[0] == "call":
                    item[3].set_exception(dead)
                elif item[0] == "submit":
                    _emit(item[1], Failed(dead))
                elif item[0] == "job":
                    item[1].close()
        finally:
            self._slices.close()
            mx.clear_streams()  # MLX requires each thread to release its streams before it ends

    def advance(self, runner: Runner) -> None:
        """One scheduling step of ``runner``: admit the waiting requests that fit, then decode one token
        for its batch. The engine thread calls it for each runner; a distributed worker calls it on each
        rank in lockstep (see :mod:`mlx_manager_nb.distributed.worker`), from the thread that owns its MLX work."""
        if runner.parked:
            self._unpark(runner)
        if runner.prefilling:
            self._end_prefills(runner)
        if runner.waiting:
            self._admit(runner)
        if runner.active:
            self._step(runner)

    def _advance_all(self) -> None:
        """Step every runner, timing the decode steps, then give background work a slice if one is due."""
        start = time.perf_counter()
        clients = {s.request.client for r in self._runners.values() for s in r.active.values()}
        self._fit_blas()
        for runner in list(self._runners.values()):
            self.advance(runner)
        decoding = bool(clients)
        if decoding:
            self._slices.step_took(time.perf_counter() - start, clients)
        if self._slices:
            self._slices.run(decoding)

    def _fit_blas(self) -> None:
        """Set OpenBLAS's threads for this round's work (see blas.fit_threads): prefills, background slices
        and batches of several rows are wide, one decoding row is not; a change waits for the steps in flight."""
        if not blas.adaptive():  # nothing to set (no OpenBLAS bound, or a fixed count): keep the step's path bare
            return
        runners = list(self._runners.values())

        def in_flight_done() -> None:
            for r in runners:
                if r.gen is not None:
                    mx.synchronize(r.gen.stream)

        blas.fit_threads(bool(self._slices) or sum(len(r.active) + len(r.waiting) for r in runners) > 1,
                         in_flight_done)

    def _drain(self, wait: float) -> None:
        try:
            item = self._inbox.get(timeout=wait) if wait > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item[0] == "call":
                _, fn, args, fut = item
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(*args))
                    except BaseException as e:
                        fut.set_exception(e)
            elif item[0] == "submit":
                self._enqueue(item[1])
            elif item[0] == "job":
                self._slices.add(item[1], item[2])
            else:
                raise _Stop
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _enqueue(self, request: Request, from_disk: bool = True) -> None:
        runner = self._runners.get(request.model)
        if runner is not None and from_disk and self._read_from_disk(runner, request):
            return
        if runner is None:
            _emit(request, Failed(EngineError(f"model {request.model!r} is not loaded")))
        else:  # behind those of its priority or higher
            at = next((i for i, q in enumerate(runner.waiting) if q.priority < request.priority), len(runner.waiting))
            runner.waiting.insert(at, request)

    def _read_from_disk(self, runner: Runner, request: Request) -> bool:
        """Where the disk tier holds a prefix of ``request``'s prompt longer than the memory tier's by more
        than :data:`PREFILL_THRESHOLD` tokens, read it in the background; the request waits for it."""
        try:
            found = runner.disk.find(request.prompt) if runner.disk is not None else None
            if found is None or found[1] <= _memory_hit(runner, request.prompt) + PREFILL_THRESHOLD:
                return False
        except Exception:  # the disk tier is an optimization: never a failed request
            return False
        runner.loading.append(request)
        assert runner.disk is not None
        runner.disk.read(found[0], lambda fut: self._inbox.put(("call", self._from_disk, (runner, request, fut),
                                                                       Future())))
        return True

    def _from_disk(self, runner: Runner, request: Request, read: Future) -> None:
        """Make the KV cache of a prefix read from disk in slices; a file gone or corrupt is a miss."""
        if request not in runner.loading:  # its model was unloaded meanwhile, or the engine stopped
            return
        found = None if read.exception() else read.result()
        if found is not None:
            self._slices.add(self._build_from_disk(runner, request, *found), request.priority, request.client)
        else:
            runner.loading.remove(request)
            self._enqueue(request, from_disk=False)

    def _build_from_disk(self, runner: Runner, request: Request, tokens: list[int], layout: dict[str, str],
                         arrays: Any) -> Job:
        """Make a prefix's KV cache from the arrays read from disk, as many layers per slice as its time
        allows; then the memory tier holds it and ``request`` is queued (a file of another shape is a miss)."""
        budget = yield
        cache: list[Any] = []
        start = time.perf_counter()
        try:
            for layer in cache_layers(layout, arrays):
                cache.append(layer)
                start, budget = yield from pause(start, budget)
        except Exception:
            cache = []
        if request not in runner.loading:
            return
        runner.loading.remove(request)
        if cache:
            self._bound_prompt_cache(runner)
            runner.prompt_cache.insert_cache(runner.name, tokens, cache)
        self._enqueue(request, from_disk=False)

    def _admit(self, runner: Runner) -> None:
        """Move waiting requests into the batch while its estimated KV bytes fit the runner's budget."""
        now = time.perf_counter()
        for request in [q for q in runner.waiting if q.cancelled.is_set() or (q.deadline and now > q.deadline)]:
            runner.waiting.remove(request)
            _emit(request, _done(request, "cancelled" if request.cancelled.is_set() else "timeout", None, 0, 0, None))
        while runner.waiting:
            request = runner.waiting[0]
            slots = _kv_slots(len(request.prompt) + request.params.limit)
            if (runner.active or runner.prefilling) and runner.kv_budget is not None and runner.token_bytes is None:
                try:
                    runner.token_bytes = _kv_bytes_per_token(runner)
                except Exception as e:  # the model itself fails: so would its batch step
                    runner.drop(EngineError(f"generation failed on {runner.name}: {e}"))
                    return
            if not _fits(runner, slots):
                return
            runner.waiting.popleft()
            self._start(runner, request, slots)
            self._bound_prompt_cache(runner)

    def _bound_prompt_cache(self, runner: Runner, used: int = 0) -> None:
        """Give the prompt cache what the running sequences leave of the budget: their reserved KV,
        or ``used`` (the bytes their caches hold) where that is more."""
        if runner.kv_budget is None:
            return
        count, longest = _reserved(runner)
        reserved = count * longest * (runner.token_bytes or 0)
        room = max(0, runner.kv_budget - max(used, reserved))
        runner.prompt_cache.max_bytes = room
        runner.prompt_cache.trim_to(n_bytes=room)

    def _start(self, runner: Runner, request: Request, slots: int) -> None:
        """Admit ``request``: into the batch, or first into a sliced prefill when its uncached prompt is long."""
        try:
            cache, rest = runner.prompt_cache.fetch_nearest_cache(runner.name, request.prompt)
        except Exception as e:
            _emit(request, Failed(e))
            return
        cached = len(request.prompt) - len(rest) if cache is not None else 0
        runner.lookups += 1
        runner.hits += cached > 0
        if _plain(request, rest) and \
                (not self._sliced or len(rest) <= (BUSY_PREFILL_THRESHOLD if runner.active else PREFILL_THRESHOLD)):
            self._insert(runner, request, slots, cache, rest)
            return
        try:
            cache = cache if cache is not None else runner.new_cache()
        except Exception as e:
            _emit(request, Failed(e))
            return
        if not all(hasattr(c, "merge") for c in cache):  # a cache the batch cannot take whole: prefill inside it
            self._insert(runner, request, slots, cache if cached else None, rest)
            return
        entry = _Prefill(request, slots, cache, cached, cached)
        shared = pick_source(runner.prefilling, request.prompt, request.priority, cached)
        runner.prefilling.append(entry)
        if shared is None:
            self._slices.add(self._prefill(runner, entry), request.priority, request.client)
        else:  # its start is being prefilled for another request: wait for that (see shared_prefix)
            entry.source, entry.until = shared
            self._release(runner, shared[0])

    def _prefill(self, runner: Runner, entry: _Prefill) -> Job:
        """Run ``entry``'s prompt but its last token through the model, a chunk per slice, then insert it
        into the batch with that KV cache. It stops when the entry leaves ``runner.prefilling`` (ended)."""
        prompt, images = entry.request.prompt, entry.request.images
        budget = yield
        try:
            if images is not None:  # first the tiles whose image tokens the cache does not hold
                budget = yield from vision.encode(runner.model, images, entry.done, budget,
                                                  lambda: entry in runner.prefilling)
        except Exception as e:
            self._fail_prefill(runner, entry, e)
            return
        chunk = MIN_CHUNK
        while entry in runner.prefilling and entry.done < len(prompt) - 1:
            waited = [f.until for f in runner.prefilling if f.source is entry and f.until > entry.done]
            # a piece ends where a waiting prefill forks
            n = min(chunk, min([*waited, len(prompt) - 1]) - entry.done)
            start = time.perf_counter()
            try:
                with mx.stream(runner.batch().stream):
                    if images is None:
                        runner.model(mx.array([prompt[entry.done: entry.done + n]]), cache=entry.cache)
                    else:  # the image features in place of their tokens' embeddings
                        runner.model(None, cache=entry.cache,
                                     input_embeddings=images.embeddings(runner.model, entry.done, entry.done + n))
                    mx.eval([c.state for c in entry.cache])
            except Exception as e:
                self._fail_prefill(runner, entry, e)
                return
            took = time.perf_counter() - start
            entry.done += n
            self._release(runner, entry)
            if entry.request.progress is not None:
                with contextlib.suppress(Exception):  # a display's failure is not the request's
                    entry.request.progress(entry.done, len(prompt))
            self._account(runner)
            budget = yield
            chunk = max(MIN_CHUNK, min(2 * n, int(n * budget / max(took, 1e-6))))  # sized to this slice
        if images is not None:  # in the KV cache now
            images.release()
        if entry in runner.prefilling:
            runner.prefilling.remove(entry)
            self._insert(runner, entry.request, entry.slots, entry.cache, prompt[-1:], entry.cached)

    def _fail_prefill(self, runner: Runner, entry: _Prefill, error: Exception) -> None:
        if entry not in runner.prefilling:  # it ended meanwhile (cancelled, past its deadline): it was told
            return
        runner.prefilling.remove(entry)
        self._hand_over(runner, entry, failed=True)
        _emit(entry.request, Failed(EngineError(f"generation failed on {runner.name}: {error}")))
        mx.clear_cache()

    def _release(self, runner: Runner, source: _Prefill) -> None:
        """Start the prefills waiting for ``source`` that it has got to, each from a copy of its KV cache;
        the first copy of a prefix also goes to the prompt cache, for requests that arrive later. Those with
        short rests join the batch together when the model decoded nothing before (as if admitted together)."""
        busy = bool(runner.active)
        for entry in [e for e in runner.prefilling if e.source is source and e.until <= source.done]:
            entry.source = None
            if entry.until > entry.done:
                prefix = entry.request.prompt[:entry.until]
                if _memory_hit(runner, prefix) < entry.until:
                    self._remember(runner, prefix, fork(source.cache, source.done, entry.until))
                entry.cache = fork(source.cache, source.done, entry.until)
                entry.done = entry.cached = entry.until
            self._go_on(runner, entry, busy)

    def _go_on(self, runner: Runner, entry: _Prefill, busy: bool) -> None:
        """Prefill the rest of ``entry``'s prompt: in slices, or in the batch when short (as :meth:`_start`;
        ``busy``: the model decodes others) and no other prefill waits for it. First, the prefills waiting
        for what it holds already go on."""
        self._release(runner, entry)
        rest = entry.request.prompt[entry.done:]
        waited = any(e.source is entry for e in runner.prefilling)
        if waited or not _plain(entry.request, rest) or \
                len(rest) > (BUSY_PREFILL_THRESHOLD if busy else PREFILL_THRESHOLD):
            self._slices.add(self._prefill(runner, entry), entry.request.priority, entry.request.client)
        else:
            runner.prefilling.remove(entry)
            self._insert(runner, entry.request, entry.slots, entry.cache, rest, entry.cached)

    def _hand_over(self, runner: Runner, gone: _Prefill, failed: bool = False) -> None:
        """``gone`` left before the prefills waiting for it got their prefix: the one waiting for the most
        takes its place (waits for what it waited for, or goes on from its KV cache; from its own when
        ``gone`` failed), and the others wait for that one."""
        waiting = [e for e in runner.prefilling if e.source is gone]
        if not waiting:
            return
        heir = max(waiting, key=lambda e: e.until)
        for entry in waiting:
            if entry is not heir:
                entry.source = heir
                entry.until = min(entry.until, shared_length(heir.request.prompt, entry.request.prompt))
        if gone.source is not None:  # it was waiting itself: both share at least the shorter prefix
            heir.source, heir.until = gone.source, min(heir.until, gone.until)
            self._release(runner, gone.source)
            return
        if not failed and heir.done < gone.done <= heir.until:
            heir.cache, heir.done, heir.cached = gone.cache, gone.done, gone.done
        heir.source = None
        self._go_on(runner, heir, bool(runner.active))

    def _end_prefills(self, runner: Runner) -> None:
        """End the prefilling requests that were cancelled or ran past their deadline (their KV is dropped)."""
        now = time.perf_counter()
        ended = [e for e in runner.prefilling if e.request.cancelled.is_set()
                 or (e.request.deadline and now > e.request.deadline)]
        for entry in ended:
            runner.prefilling.remove(entry)
            self._hand_over(runner, entry)
            reason = "cancelled" if entry.request.cancelled.is_set() else "timeout"
            _emit(entry.request, _done(entry.request, reason, None, 0, entry.cached, None))
        if ended:
            self._account(runner)

    def _insert(self, runner: Runner, request: Request, slots: int, cache: list[Any] | None, rest: list[int],
                cached: int | None = None) -> None:
        """Put ``request`` into the batch: ``cache`` (None: none) holds its prompt but ``rest``; ``cached``
        (default: all the cache holds) is how much of that the prompt cache gave."""
        if request.images is not None:  # its image tokens are in ``cache`` (prefilled, or found cached)
            request.images.release()
        try:
            p = request.params
            faults: list[BaseException] = []
            sampler = make_sampler(p)
            processors: list[Processor] = make_processors(p, len(request.prompt))
            if request.images is not None:  # they read token ids: the real ones, not the image keys
                processors = [request.images.real_ids(f) for f in processors]
            recorder = Recorder(p.top_logprobs, token_bytes(runner.tokenizer)) if p.logprobs else None
            if recorder is not None:  # it sees what the sampler sees: after processors and the grammar's mask
                sampler = recorder.wrap(sampler)
            if request.constraint is not None:  # the grammar reads each token, and masks what is sampled
                processors.append(request.constraint)
                sampler = request.constraint.sampler(sampler)
            seq = _Seq(request, runner.tokenizer.detokenizer, StopMatcher(p.stop), 0, faults, slots,
                       sampler if sampler is greedy_sampler else _guard_sampler(sampler, faults),
                       [_guard_processor(f, faults) for f in processors], recorder=recorder)
            held = self._join(runner, seq, request.prompt, p.limit, (cache, rest))
            seq.cached = held if cached is None else cached
        except Exception as e:
            _emit(request, Failed(e))

    def _join(self, runner: Runner, seq: _Seq, prompt: list[int], max_tokens: int,
              found: tuple[Any, list[int]] | None = None) -> int:
        """Put ``seq`` into the batch to go on from ``prompt``; returns how many of its tokens the KV cache
        held. ``found``: a KV cache holding all of ``prompt`` but the tokens given with it (None: none), else
        the prompt cache is asked."""
        cache, rest = found if found is not None else runner.prompt_cache.fetch_nearest_cache(runner.name, prompt)
        if cache is None and runner.kv_bits is not None:  # the batch would make a full-precision one
            cache, rest = runner.new_cache(), prompt
        if cache is not None and not rest:
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        cached = len(prompt) - len(rest) if cache is not None else 0
        if seq.recorder is not None:  # picks sampled before it left the batch are never reported
            seq.recorder.clear()
        if seq.request.constraint is not None:  # it has sampled no placeholder here (it may be a prompt for a step)
            seq.request.constraint.late = False
        eos = [[t] for t in runner.tokenizer.eos_token_ids]
        (uid,) = runner.batch().insert([rest if cache is not None else prompt], max_tokens=[max_tokens],
                                       caches=[cache], all_tokens=[prompt[:cached]], samplers=[seq.sampler],
                                       logits_processors=[seq.processors], stop_sequences=[StopSequences(eos)])
        runner.active[uid] = seq
        return cached

    def _step(self, runner: Runner) -> None:
        gen = runner.batch()
        cancelled = [uid for uid, s in runner.active.items() if s.request.cancelled.is_set()]
        if cancelled:
            self._finish_removed(runner, cancelled, "cancelled")
        now = time.perf_counter()
        expired = [uid for uid, s in runner.active.items() if s.request.deadline and now > s.request.deadline]
        if expired:
            self._finish_removed(runner, expired, "timeout")
        unread = [uid for uid, s in runner.active.items()  # an image request's KV cannot be rebuilt from its keys
                  if _unread(s.request) >= self.unread_events and s.request.images is None]
        if unread:
            self._park(runner, unread)
        if not runner.active:
            self._account(runner)
            return
        if runner.solo is not None and self._solo_step(runner):
            self._account(runner)
            return
        constraints.step_begins(self._slices.step_time())
        try:
            _, responses = gen.next()
        except Exception as e:  # a failure of the batch step fails this model's batch only
            runner.fail_active(EngineError(f"generation failed on {runner.name}: {e}"))
            mx.clear_cache()
            return
        for uid in [uid for uid, s in runner.active.items() if s.faults]:
            faulty = runner.active.pop(uid)
            gen.remove([uid])
            _emit(faulty.request, Failed(_fault_error(faulty.faults[0])))
        for r in responses:
            seq = runner.active.get(r.uid)
            if seq is None:
                continue
            try:
                self._on_token(runner, r, seq)
            except Exception as e:  # this request's consumer or text handling broke: drop it alone
                runner.active.pop(r.uid, None)
                gen.remove([r.uid])
                _emit(seq.request, Failed(e))
        late = [uid for uid, s in runner.active.items() if s.request.constraint and s.request.constraint.late]
        if late:  # their tokens of this step are placeholders: they sit out until their masks are ready
            # (never an image request, whose KV its keys cannot rebuild: a vision model takes no grammar, see
            # runner.tokens)
            self._park(runner, late)
        self._go_solo(runner, {r.uid for r in responses})
        self._account(runner)

    def _go_solo(self, runner: Runner, decoded: set[int]) -> None:
        """Take the model's one decoding sequence out of the batch to decode it speculatively (see
        :mod:`.speculative`) when its request allows and a draft exists (a draft model always drafts), and no
        other client's background work waits: a verifying step costs about two plain ones, and beside that
        work a stream's steps stay plain and even, so the slices between them keep its gaps short.
        ``decoded``: the sequences this step gave a token (the others are still prompts in the batch)."""
        if len(runner.active) != 1 or runner.waiting or runner.prefilling or not self._sliced:
            return
        ((uid, seq),) = runner.active.items()
        if self._slices.others_than(seq.request.client):
            return
        p = seq.request.params
        if uid not in decoded or not p.speculative or seq.faults or runner.processor is not None:  # not a vision model
            return
        if p.temperature > 0 and p.seed is not None:  # a seed's text stays the same alone or in a batch
            return
        if seq.drafter is None:
            seq.drafter = (speculative.DraftModel(runner.draft, make_prompt_cache(runner.draft))
                           if runner.draft is not None else speculative.Lookup())
        if isinstance(seq.drafter, speculative.Lookup) and not seq.drafter.draft(
                [*seq.request.prompt, *seq.detok.tokens], speculative.DRAFT_TOKENS):
            return
        if not speculative.trimmable(runner.new_cache()):  # a recurrent model's state cannot give drafts back
            return
        cache, tokens = runner.batch().remove([uid], return_prompt_caches=True)[uid]
        if seq.recorder is not None:  # the pick of the step in flight is never reported
            seq.recorder.clear()
        if seq.request.constraint is not None:
            seq.request.constraint.catch_up(list(tokens))
        runner.solo = speculative.go(uid, seq, cache, list(tokens), seq.drafter, seq.request.params)

    def _solo_step(self, runner: Runner) -> bool:
        """One speculative step of the runner's solo sequence; False when it went back into the batch
        instead (another sequence joined the model, another client's background work came, or its drafts
        stopped coming)."""
        solo = runner.solo
        assert solo is not None
        seq, p = solo.seq, solo.seq.request.params
        if len(runner.active) > 1 or solo.misses >= speculative.MISSES or self._slices.others_than(seq.request.client):
            runner.solo = None
            del runner.active[solo.uid]
            cache, _ = solo.release()
            try:
                self._join(runner, seq, solo.tokens, p.limit - seq.tokens, (cache, solo.tokens[-1:]))
            except Exception as e:
                _emit(seq.request, Failed(e))
            return False
        constraint = seq.request.constraint
        processors = seq.processors[:-1] if constraint is not None else seq.processors  # the grammar's is last
        try:
            with mx.stream(runner.batch().stream):
                out = speculative.step(solo, runner.model, processors, constraint, p, p.limit - seq.tokens,
                                       seq.recorder is not None)
            if seq.faults:
                raise seq.faults[0]
            runner.drafted += solo.drafts
            runner.accepted += len(out) - 1
        except Exception as e:
            runner.solo = None
            del runner.active[solo.uid]
            _emit(seq.request, Failed(_fault_error(e)))
            mx.clear_cache()
            return True
        eos = runner.tokenizer.eos_token_ids
        for i, token in enumerate(out):
            solo.tokens.append(token)
            if seq.recorder is not None and solo.rows is not None:
                seq.recorder.record(solo.rows[i], mx.array(token))
            reason = "stop" if token in eos else "length" if seq.tokens + 1 >= p.limit else None
            ended = solo.release() if reason is not None else (None, None)
            if reason is not None:
                runner.solo = None
            try:
                self._on_token(runner, _Token(solo.uid, token, reason, ended[1], ended[0]), seq)
            except Exception as e:  # as in the batch: this request's consumer or text handling broke
                runner.active.pop(solo.uid, None)
                runner.solo = None
                _emit(seq.request, Failed(e))
            if solo.uid not in runner.active:  # ended: by eos, max_tokens or a stop string
                break
        return True

    def _account(self, runner: Runner) -> None:
        """Trim the prompt cache to its share of the budget and record the runner's KV figures."""
        runner.kv_bytes = runner.batch().prompt_cache_nbytes + sum(c.nbytes for p in runner.prefilling for c in p.cache)
        if runner.solo is not None:
            runner.kv_bytes += sum(c.nbytes for c in runner.solo.cache)
        self._bound_prompt_cache(runner, runner.kv_bytes)
        runner.cache_bytes = runner.prompt_cache.nbytes

    def _on_token(self, runner: Runner, r: Any, seq: _Seq) -> None:
        if seq.first is None:
            seq.first = time.perf_counter()
        entry = seq.recorder.take(r.token) if seq.recorder is not None else None
        if r.finish_reason != "stop":  # an eos token is not part of the text
            seq.tokens += 1
            seq.detok.add_token(r.token)
            if entry is not None:
                seq.pending.append(entry)
        if r.finish_reason is not None:
            seq.detok.finalize()
        text, hit = seq.stops.feed(seq.detok.last_segment)
        if hit is None and r.finish_reason is not None:
            text += seq.stops.flush()
        if text:
            seq.request.emit(Delta(text, tuple(seq.pending)))
            seq.pending.clear()
        if hit is not None:
            self._finish_removed(runner, [r.uid], "stop", hit)
        elif r.finish_reason is not None:
            del runner.active[r.uid]
            self._remember(runner, r.all_tokens, r.prompt_cache, seq.request.keep)
            _emit(seq.request, self._seq_done(seq, r.finish_reason))

    def _finish_removed(self, runner: Runner, uids: list[int], reason: str, stop: str | None = None) -> None:
        for seq in self._remove(runner, uids):
            _emit(seq.request, self._seq_done(seq, reason, stop))

    def _remove(self, runner: Runner, uids: list[int]) -> list[_Seq]:
        """Take sequences out of the batch, their KV into the prompt cache; returns them."""
        caches = runner.batch().remove(uids, return_prompt_caches=True)
        if runner.solo is not None and runner.solo.uid in uids:  # decoded outside the batch: its own cache
            caches[runner.solo.uid] = runner.solo.release()
            runner.solo = None
        removed = [runner.active.pop(uid) for uid in uids]
        for uid in uids:
            if uid in caches and caches[uid][1]:
                cache, tokens = caches[uid]
                self._remember(runner, list(tokens), cache)
        return removed

    def _park(self, runner: Runner, uids: list[int]) -> None:
        """Take sequences whose consumers stopped reading out of the batch until they read (see _unpark)."""
        for seq in self._remove(runner, uids):
            runner.parked.append(_Parked(seq, [*seq.request.prompt, *seq.detok.tokens], time.monotonic()))

    def _unpark(self, runner: Runner) -> None:
        """End the parked sequences cancelled, timed out or unread too long; put back into the batch
        those whose consumers have taken most of their events, as their KV budget allows."""
        now = time.perf_counter()
        for parked in list(runner.parked):
            seq, request = parked.seq, parked.seq.request
            read = _unread(request) <= self.unread_events // 2
            if not read and time.monotonic() - parked.since > self.unread_timeout:
                cut(request, "unread")
            late = request.deadline is not None and now > request.deadline
            mask = request.constraint
            masked = mask is None or not mask.late or mask.ready()
            if request.cancelled.is_set() or late:
                runner.parked.remove(parked)
                _emit(request, self._seq_done(seq, "cancelled" if request.cancelled.is_set() else "timeout"))
            elif masked and mask is not None and (error := mask.budget_error()) is not None:  # its late mask
                runner.parked.remove(parked)
                _emit(request, Failed(error))
            elif read and masked and _fits(runner, seq.slots):  # else it waits for room, as a new request would
                runner.parked.remove(parked)
                try:
                    self._join(runner, seq, parked.tokens, request.params.limit - seq.tokens)
                except Exception as e:
                    _emit(request, Failed(e))

    def _remember(self, runner: Runner, tokens: list[int], cache: list[Any], keep: bool = False) -> None:
        """Keep a finished sequence's KV in the prompt cache, within what the running ones leave, and on
        disk when long enough (``keep``: whatever its length).

        The cache is evaluated now: until then it is a lazy copy that keeps the batch's whole buffer alive.
        """
        mx.eval([c.state for c in cache])
        self._bound_prompt_cache(runner)
        runner.prompt_cache.insert_cache(runner.name, tokens, cache)
        self._save(runner, tokens, cache, keep)

    def _save(self, runner: Runner, tokens: list[int], cache: list[Any], keep: bool = False) -> None:
        """Write ``cache`` to the disk tier, in slices, when long enough (``keep``: whatever its length) and
        not there yet (see :meth:`~mlx_manager_nb.kv_disk.DiskTier.save`)."""
        job = runner.disk.save(tokens, cache, keep) if runner.disk is not None else None
        if job is not None:
            self._slices.add(job)

    @staticmethod
    def _seq_done(seq: _Seq, reason: str, stop: str | None = None) -> Done:
        ttft = seq.first - seq.request.submitted if seq.first is not None else None
        return _done(seq.request, reason, stop, seq.tokens, seq.cached, ttft)


def _plain(request: Request, rest: list[int]) -> bool:
    """Whether ``rest``, the end of ``request``'s prompt, is all text tokens (the batch can prefill them)."""
    return request.images is None or len(request.prompt) - len(rest) >= request.images.end


def _memory_hit(runner: Runner, tokens: list[int]) -> int:
    """How many of ``tokens`` the memory tier would give (mlx-lm's trie, searched without copying a cache)."""
    result = runner.prompt_cache._trie.search(runner.name, tokens)
    if result.exact is not None:
        return len(tokens)
    return max(len(result.shorter or ()), result.common_prefix if result.longer is not None else 0)


def _on_evict(prompt_cache: LRUPromptCache, evicted: Callable[[list[int], list[Any]], None]) -> None:
    """Call ``evicted(tokens, cache)`` for each entry mlx-lm's ``LRUPromptCache`` drops to keep within its
    entry and byte bounds. It has no hook, but every such drop (and nothing else) goes through its trie's
    ``pop``; prefixes it drops because a longer entry holds them are not evictions."""
    pop = prompt_cache._trie.pop

    def popped(model: Any, tokens: list[int]) -> Any:
        entry = pop(model, tokens)
        with contextlib.suppress(Exception):  # the disk tier is an optimization: never a failed request
            evicted(list(tokens), entry.prompt_cache)
        return entry

    prompt_cache._trie.pop = popped  # type: ignore[method-assign]


def _unread(request: Request) -> int:
    return request.backlog() if request.backlog is not None else 0


def cut(request: Request, cause: str | None = None) -> None:
    """Cancel ``request``; ``cause`` ("shutdown" or "unread") when the server cuts it, not its consumer."""
    if not request.cancelled.is_set():
        request.cause = cause
    request.cancelled.set()


def _kv_slots(tokens: int) -> int:
    """KV positions to reserve for a sequence of ``tokens``: caches grow in steps of 256 positions,
    and merging sequences into a running batch pads them, which can take one step more."""
    return (-(-tokens // KVCache.step) + 1) * KVCache.step


def _fits(runner: Runner, slots: int) -> bool:
    """Whether one more sequence of ``slots`` keeps the estimated KV of those decoding or prefilling within
    the budget (always, while none holds a reservation: a request larger than the budget still runs alone)."""
    count, longest = _reserved(runner)
    if not count or runner.kv_budget is None or runner.token_bytes is None:
        return True
    return (count + 1) * max(slots, longest) * runner.token_bytes <= runner.kv_budget


def _reserved(runner: Runner) -> tuple[int, int]:
    """How many sequences hold KV reservations on ``runner`` (decoding or prefilling) and the largest one."""
    seqs: list[_Seq | _Prefill] = [*runner.active.values(), *runner.prefilling]
    return len(seqs), max((s.slots for s in seqs), default=0)


def _kv_bytes_per_token(runner: Runner) -> int:
    """KV-cache bytes one token position takes (quantized ones where ``kv_bits`` is set), measured with a
    one-token forward pass.

    Caches that do not grow with the sequence (recurrent state) are counted whole, per token: an
    overestimate, so the budget still holds.
    """
    cache = runner.new_cache()
    runner.model(mx.array([[0]]), cache=cache)
    mx.eval([c.state for c in cache])
    total = 0
    for c in cache:
        keys = getattr(c, "keys", None)
        keys = keys[0] if isinstance(keys, tuple) else keys  # quantized: packed data, scales, biases
        total += c.nbytes // keys.shape[2] if isinstance(keys, mx.array) and keys.ndim == 4 else c.nbytes
    return max(1, total)


def _guard_sampler(sampler: Callable[[mx.array], mx.array], faults: list) -> Callable[[mx.array], mx.array]:
    """``sampler`` for one sequence, made harmless: an exception is kept in ``faults`` (the engine
    then fails that sequence alone) and the step goes on with the greedy token."""

    def sample(logprobs: mx.array) -> mx.array:
        try:
            return sampler(logprobs)
        except Exception as e:
            faults.append(e)
            return greedy_sampler(logprobs)

    return sample


def _guard_processor(processor: Processor, faults: list) -> Processor:
    """``processor`` for one sequence: an exception is kept in ``faults`` and the logits pass unchanged."""

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        try:
            return processor(tokens, logits)
        except Exception as e:
            faults.append(e)
            return logits

    return process


def _fault_error(fault: BaseException) -> BaseException:
    """What a request whose sampler or processor raised fails with: the request's own fault as it is
    (a grammar over its budget), anything else as the engine's."""
    if isinstance(fault, InvalidParameterError):
        return fault
    return EngineError(f"sampling failed for this request: {fault!r}")


def _done(request: Request, reason: str, stop: str | None, tokens: int, cached: int, ttft: float | None) -> Done:
    return Done(reason, stop, len(request.prompt), tokens, cached, ttft, time.perf_counter() - request.submitted,
                request.cause if reason == "cancelled" else None)


def _emit(request: Request, event: Event) -> None:
    """Deliver a final event; a consumer that is gone cannot be told, and that is fine."""
    with contextlib.suppress(Exception):
        request.emit(event)


def _return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc keeps them otherwise, and RSS stays high)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _load_libc()


def stop_all() -> None:
    """End every engine thread (at exit: MLX aborts the process if a thread is still inside it)."""
    for engine in list(_engines):
        engine.stop(timeout=5.0)
