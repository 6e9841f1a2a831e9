"""The inference engine: one thread owns all MLX work, with continuous batching per model.

Requests go in with :meth:`Engine.submit`; each one's events (``Delta``, then ``Done`` or
``Failed``) come out through the request's ``emit`` callable, called on the engine thread.
Consumers hop to their own thread or loop (see :mod:`mlx_manager_nb.streams`).
Other MLX work (loading, unloading) runs on the same thread through :meth:`Engine.run`.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import LRUPromptCache, trim_prompt_cache

from .errors import EngineError, ModelNotFoundError
from .params import GenParams, make_processors, make_sampler
from .stops import StopMatcher

PROMPT_CACHE_ENTRIES = 16
_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


class _Stop(Exception):
    """Asks the engine thread to end."""


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    finish_reason: str  # "stop", "length", "cancelled" or "timeout"
    stop: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft: float | None
    duration: float

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
    constraint: Callable[[mx.array, mx.array], mx.array] | None = None  # a grammar's logits processor


@dataclass
class _Seq:
    request: Request
    detok: Any
    stops: StopMatcher
    cached: int
    tokens: int = 0
    first: float | None = None


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

    def batch(self) -> BatchGenerator:
        if self.gen is None:
            self.gen = BatchGenerator(self.model, completion_batch_size=32, prefill_batch_size=8)
        return self.gen


class Engine:
    """The single thread that runs every MLX operation of a pool."""

    def __init__(self, on_tick: Callable[[], None] | None = None, tick_seconds: float = 1.0):
        self._runners: dict[str, Runner] = {}
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._on_tick = on_tick
        self._tick_seconds = tick_seconds
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
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

    def stop(self, timeout: float = 10.0) -> None:
        """End the engine thread after the work queued before this call; requests still running end as
        cancelled. A later call restarts it."""
        if self.alive:
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

    def remove_runner(self, name: str, error: BaseException) -> None:
        """Stop serving ``name``: its requests fail with ``error`` (call on the engine thread)."""
        runner = self._runners.pop(name, None)
        if runner is not None:
            _fail_all(runner, error)
        mx.clear_cache()

    def submit(self, request: Request) -> None:
        """Queue a request; it joins its model's running batch at the next step."""
        self._ensure_thread()
        self._inbox.put(("submit", request))

    # -- the engine thread -------------------------------------------------------------------

    def _main(self) -> None:
        self.error = None
        next_tick = time.monotonic() + self._tick_seconds
        try:
            while True:
                busy = any(r.active for r in self._runners.values())
                wait = 0 if busy else max(0.0, next_tick - time.monotonic())
                self._drain(wait)
                for runner in list(self._runners.values()):
                    if runner.active:
                        self._step(runner)
                if self._on_tick and time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + self._tick_seconds
                    self._on_tick()
        except _Stop:  # requests still running end as cancelled
            for runner in self._runners.values():
                for seq in runner.active.values():
                    _emit(seq.request, self._seq_done(seq, "cancelled"))
                runner.active.clear()
                runner.gen = None
        except BaseException as e:  # the thread is dying: say so to everyone waiting on it
            self.error = e
            dead = EngineError(f"the engine thread died: {e!r}")
            for runner in self._runners.values():
                _fail_all(runner, dead)
            while True:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item[0] == "call":
                    item[3].set_exception(dead)
                elif item[0] == "submit":
                    _emit(item[1], Failed(dead))
        finally:
            mx.clear_streams()  # MLX requires each thread to release its streams before it ends

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
                self._insert(item[1])
            else:
                raise _Stop
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _insert(self, request: Request) -> None:
        runner = self._runners.get(request.model)
        if runner is None:
            _emit(request, Failed(EngineError(f"model {request.model!r} is not loaded")))
            return
        if request.cancelled.is_set():
            _emit(request, _done(request, "cancelled", None, 0, 0, None))
            return
        try:
            prompt = request.prompt
            cache, rest = runner.prompt_cache.fetch_nearest_cache(runner.name, prompt)
            if cache is not None and not rest:
                trim_prompt_cache(cache, 1)
                rest = prompt[-1:]
            cached = len(prompt) - len(rest) if cache is not None else 0
            p = request.params
            eos = [[t] for t in runner.tokenizer.eos_token_ids]
            (uid,) = runner.batch().insert(
                [rest if cache is not None else prompt],
                max_tokens=[p.max_tokens],
                caches=[cache],
                all_tokens=[prompt[:cached]],
                samplers=[make_sampler(p)],
                logits_processors=[make_processors(p) + ([request.constraint] if request.constraint else [])],
                stop_sequences=[StopSequences(eos)],
            )
        except Exception as e:
            _emit(request, Failed(e))
            return
        runner.active[uid] = _Seq(request, runner.tokenizer.detokenizer, StopMatcher(p.stop), cached)

    def _step(self, runner: Runner) -> None:
        gen = runner.batch()
        cancelled = [uid for uid, s in runner.active.items() if s.request.cancelled.is_set()]
        if cancelled:
            self._finish_removed(runner, cancelled, "cancelled")
        now = time.perf_counter()
        expired = [uid for uid, s in runner.active.items() if s.request.deadline and now > s.request.deadline]
        if expired:
            self._finish_removed(runner, expired, "timeout")
        if not runner.active:
            return
        try:
            _, responses = gen.next()
        except Exception as e:  # a failure of the batch step fails this model's batch only
            _fail_all(runner, EngineError(f"generation failed on {runner.name}: {e}"))
            mx.clear_cache()
            return
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

    def _on_token(self, runner: Runner, r: Any, seq: _Seq) -> None:
        if seq.first is None:
            seq.first = time.perf_counter()
        if r.finish_reason != "stop":  # an eos token is not part of the text
            seq.tokens += 1
            seq.detok.add_token(r.token)
        if r.finish_reason is not None:
            seq.detok.finalize()
        text, hit = seq.stops.feed(seq.detok.last_segment)
        if hit is None and r.finish_reason is not None:
            text += seq.stops.flush()
        if text:
            seq.request.emit(Delta(text))
        if hit is not None:
            self._finish_removed(runner, [r.uid], "stop", hit)
        elif r.finish_reason is not None:
            del runner.active[r.uid]
            runner.prompt_cache.insert_cache(runner.name, r.all_tokens, r.prompt_cache)
            _emit(seq.request, self._seq_done(seq, r.finish_reason))

    def _finish_removed(self, runner: Runner, uids: list[int], reason: str, stop: str | None = None) -> None:
        caches = runner.batch().remove(uids, return_prompt_caches=True)
        for uid in uids:
            seq = runner.active.pop(uid)
            if uid in caches and caches[uid][1]:
                cache, tokens = caches[uid]
                runner.prompt_cache.insert_cache(runner.name, list(tokens), cache)
            _emit(seq.request, self._seq_done(seq, reason, stop))

    @staticmethod
    def _seq_done(seq: _Seq, reason: str, stop: str | None = None) -> Done:
        ttft = seq.first - seq.request.submitted if seq.first is not None else None
        return _done(seq.request, reason, stop, seq.tokens, seq.cached, ttft)


def _done(request: Request, reason: str, stop: str | None, tokens: int, cached: int, ttft: float | None) -> Done:
    return Done(reason, stop, len(request.prompt), tokens, cached, ttft, time.perf_counter() - request.submitted)


def _fail_all(runner: Runner, error: BaseException) -> None:
    """End every request of ``runner`` with ``error`` and drop its batch."""
    for seq in runner.active.values():
        seq.request.cancelled.set()
        _emit(seq.request, Failed(error))
    runner.active.clear()
    runner.gen = None


def _emit(request: Request, event: Event) -> None:
    """Deliver a final event; a consumer that is gone cannot be told, and that is fine."""
    try:
        request.emit(event)
    except Exception:
        pass


def stop_all() -> None:
    """End every engine thread (at exit: MLX aborts the process if a thread is still inside it)."""
    for engine in list(_engines):
        engine.stop(timeout=5.0)
