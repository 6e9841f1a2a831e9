"""Embedding models in the pool: which folders are ones, and batched embedding on their encoders.

The model itself (a BERT encoder and its loading) is :mod:`mlx_manager_nb.bert`. Callers tokenize
on their own thread, then append their token ids to the model's pending list; the first one to
find the list empty schedules one flush job on the engine thread, which embeds everything pending
by then, sorted by length, in as few padded forward passes as the token budget allows. Concurrent
callers thus share forward passes; chat batching is untouched. The flush runs as a sliced engine job
(see :mod:`mlx_manager_nb.slices`): one forward pass per slice, cut to the rows the slice's time
allows at the model's measured speed, so running chat streams keep their pace beside a large batch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import bert
from .bert import ENCODER_TYPES, Bert, Spec, read_spec
from .engine import Engine, Runner
from .errors import EngineError, InvalidParameterError, ModelNotFoundError
from .request import RequestContext
from .slices import Job
from .store import read_config

MAX_INPUTS = 2048  # as OpenAI's /v1/embeddings
BATCH_TOKENS = 8192  # padded tokens per forward pass
MIN_FILL = 0.5  # a pass takes no sequence shorter than this fraction of its longest one
FIRST_PASS_TOKENS = 64  # padded tokens of a model's first pass, before its speed is known (later ones fit their slice)

Inputs = str | list[str] | list[int] | list[list[int]]


def _bad(message: str, param: str = "input") -> InvalidParameterError:
    """A bad embedding request; ``param`` names the field at fault."""
    return InvalidParameterError(param, message)


# -- the pool's view of a model folder -------------------------------------------------------


def model_kind(path: Path) -> str:
    """``"embedding"`` for an encoder folder (a BERT config or sentence-transformers modules), else ``"chat"``."""
    encoder = read_config(path).get("model_type") in ENCODER_TYPES or (Path(path) / "modules.json").is_file()
    return "embedding" if encoder else "chat"


def max_length(path: Path) -> int | None:
    """The longest input, in tokens, the embedding model at ``path`` takes (None: its config lacks sizes)."""
    try:
        return read_spec(path).max_length
    except KeyError:
        return None


def prepare(name: str, path: Path) -> Callable[[], Runner]:
    """Read an encoder's config and tokenizer (any thread); the function returned makes its runner, the
    weights read lazily, with an empty queue for its jobs (on the engine thread)."""
    config, spec, tokenizer = bert.read(path)
    return lambda: Runner(name, bert.build(path, config, spec), tokenizer, embed_queue=_Queue())


# -- requests ---------------------------------------------------------------------------------


@dataclass
class _Job:
    """One caller's texts: token ids in, vectors out, resolved on the engine thread."""

    tokens: list[list[int]]
    dimensions: int
    finish: Callable[[_Job, BaseException | None], None]
    vectors: np.ndarray | None = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)  # its caller left: drop its rows


@dataclass
class _Queue:
    """The jobs waiting for a model's next flush."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: list[_Job] = field(default_factory=list)
    scheduled: bool = False
    speed: float | None = None  # padded tokens per second of the last forward pass (engine thread)


@dataclass
class Embedded:
    """The result of one embedding request."""

    vectors: np.ndarray  # (n, dimensions) float32
    prompt_tokens: int
    duration: float


def _tokens(runner: Runner, inputs: Any, truncate: bool) -> list[list[int]]:
    """Token ids per input, checked: strings are tokenized, token-id lists are the model's own ids."""
    spec: Spec = runner.model.spec
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(isinstance(t, int) for t in inputs)):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise _bad("'input' must be a non-empty string, a non-empty list of strings, or token ids")
    if len(inputs) > MAX_INPUTS:
        raise _bad(f"'input' holds {len(inputs)} items; at most {MAX_INPUTS} per request")
    if isinstance(inputs[0], str):
        for i, t in enumerate(inputs):
            if not isinstance(t, str):
                raise _bad(f"'input[{i}]' must be a string like input[0], got {type(t).__name__}")
            if not t:
                raise _bad(f"'input[{i}]' is an empty string")
        encodings = runner.tokenizer.encode_batch(inputs, add_special_tokens=False)
        special = runner.tokenizer.post_processor.num_special_tokens_to_add(False) \
            if runner.tokenizer.post_processor else 0
        out = []
        for i, e in enumerate(encodings):
            if len(e.ids) + special > spec.max_length:
                if not truncate:
                    raise _bad(f"'input[{i}]' is {len(e.ids) + special} tokens; {runner.name} takes at most "
                                     f"{spec.max_length} (truncate=True cuts it)")
                e.truncate(spec.max_length - special)
            out.append(runner.tokenizer.post_process(e).ids if special else e.ids)
        return out
    out = []
    for i, t in enumerate(inputs):
        if not isinstance(t, list) or not t or not all(isinstance(x, int) and not isinstance(x, bool) for x in t):
            raise _bad(f"'input[{i}]' must be a non-empty list of token ids like input[0], got {t!r:.40}")
        bad = next((x for x in t if not 0 <= x < spec.vocab_size), None)
        if bad is not None:
            raise _bad(f"'input[{i}]' holds token id {bad}, outside {runner.name}'s vocabulary "
                             f"(0..{spec.vocab_size - 1}); token ids are the model's own")
        if len(t) > spec.max_length:
            if not truncate:
                raise _bad(f"'input[{i}]' is {len(t)} tokens; {runner.name} takes at most {spec.max_length}")
            t = t[: spec.max_length]
        out.append(t)
    return out


def _dimensions(spec: Spec, name: str, dimensions: Any) -> int:
    if dimensions is None or dimensions == spec.dimensions:
        return spec.dimensions
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions not in spec.matryoshka:
        sizes = ", ".join(map(str, (*spec.matryoshka, spec.dimensions)))
        raise _bad(f"'dimensions' must be one of {sizes} for {name}"
                         + ("" if spec.matryoshka else ": it does not support shorter embeddings"), "dimensions")
    return dimensions


def _buckets(lengths: list[int]) -> list[list[int]]:
    """Group indices, longest first, into passes within BATCH_TOKENS padded tokens and MIN_FILL padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        g = groups[-1] if groups else None
        if g and (len(g) + 1) * lengths[g[0]] <= BATCH_TOKENS and lengths[i] >= MIN_FILL * lengths[g[0]]:
            g.append(i)
        else:
            groups.append([i])
    return groups


def _forward(model: Bert, seqs: list[list[int]]) -> np.ndarray:
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), model.spec.pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), width), dtype=np.float32)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = s
        mask[row, : len(s)] = 1
    out = model(mx.array(ids), mx.array(mask))
    return np.array(out.astype(mx.float32))


def _normalized(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def _flush(engine: Engine, runner: Runner) -> Job:
    """Embed every job pending on a model, one forward pass per slice (an engine job)."""
    model: Bert = runner.model
    queue: _Queue = runner.embed_queue
    with queue.lock:
        jobs, queue.pending, queue.scheduled = queue.pending, [], False
    try:
        budget = yield
        seqs = [(job, row, ids) for job in jobs for row, ids in enumerate(job.tokens)]
        vectors = np.empty((len(seqs), model.spec.dimensions), dtype=np.float32)
        groups = _buckets([len(s[2]) for s in seqs])
        while groups:
            if engine.runner(runner.name) is not runner:
                raise ModelNotFoundError(f"model {runner.name!r} was unloaded")
            jobs = _drop_cancelled(jobs)
            live = {id(job) for job in jobs}
            groups = [g for g in ([i for i in g if id(seqs[i][0]) in live] for g in groups) if g]
            if not groups:
                break
            width = len(seqs[groups[0][0]][2])  # the group's longest
            fits = max(1, int((FIRST_PASS_TOKENS if queue.speed is None else queue.speed * budget) // width))
            rows, groups[0] = groups[0][:fits], groups[0][fits:]
            start = time.perf_counter()
            vectors[rows] = _forward(model, [seqs[i][2] for i in rows])
            queue.speed = len(rows) * width / max(time.perf_counter() - start, 1e-6)
            groups = [g for g in groups if g]
            if groups:
                budget = yield
    except GeneratorExit:  # the engine stopped
        for job in jobs:
            job.finish(job, EngineError("the engine stopped"))
        raise
    except Exception as e:
        mx.clear_cache()
        for job in jobs:
            job.finish(job, e)
        return
    starts = {id(job): i for i, (job, row, _) in enumerate(seqs) if row == 0}
    for job in _drop_cancelled(jobs):
        v = vectors[starts[id(job)]: starts[id(job)] + len(job.tokens), : job.dimensions]
        job.vectors = _normalized(v) if model.spec.normalize else v
        job.finish(job, None)


def _drop_cancelled(jobs: list[_Job]) -> list[_Job]:
    """End the jobs whose callers left (their rows say cancelled, their rows of the batch are skipped)."""
    live = []
    for job in jobs:
        if job.cancelled.is_set():
            job.finish(job, None)
        else:
            live.append(job)
    return live


def _submit(pool: Any, inputs: Any, model: str | None, truncate: bool, dimensions: int | None,
            meta: dict | RequestContext | None) -> _Job:
    """Check and tokenize a request, then queue it on its model (any thread but the engine's)."""
    context = pool.request_context(meta, False, None, model, "embed")  # a bad meta is refused with its row
    try:
        info = pool.find(model, kind="embedding")
        if info.kind != "embedding":
            raise _bad(f"model {info.alias or info.name!r} is a {info.kind} model; embeddings need an "
                             f"embedding model (e.g. 'demo-embed')", "model")
        runner = pool.engine.runner(info.name)
        tokens = _tokens(runner, inputs, truncate)
        dims = _dimensions(runner.model.spec, info.alias or info.name, dimensions)
    except Exception as e:
        pool.record_refused(e, model, context, "embed")
        raise

    def finish(job: _Job, error: BaseException | None) -> None:
        cancelled = job.cancelled.is_set()  # its caller left; nobody reads the future
        outcome = (dict(status="cancelled" if cancelled else "ok", prompt_tokens=sum(map(len, tokens)),
                        completion_tokens=0, duration=time.time() - record.started)
                   if error is None or cancelled else record.failed(error))
        error = CancelledError() if cancelled else error
        row = record.end(outcome, {"prompt": inputs, "completion": ""})
        if error is not None:
            job.future.set_exception(error)
        else:
            assert job.vectors is not None  # _flush sets them before finishing a job without error
            job.future.set_result(Embedded(job.vectors, row["prompt_tokens"], row["duration"]))

    job = _Job(tokens, dims, finish)
    job.future.set_running_or_notify_cancel()  # a caller that gives up sets ``job.cancelled`` instead
    record = pool.begin("embed", info.name, context)
    queue = runner.embed_queue
    with queue.lock:
        queue.pending.append(job)
        schedule, queue.scheduled = not queue.scheduled, True
    if schedule:
        pool.engine.add_job(_flush(pool.engine, runner), context.priority)
    return job


def run(pool: Any, inputs: Inputs, model: str | None = None, *, truncate: bool = False,
        dimensions: int | None = None, meta: dict | RequestContext | None = None) -> Embedded:
    """Embed ``inputs`` on an embedding model of ``pool``, blocking until done (an interrupt cancels it)."""
    job = _submit(pool, inputs, model, truncate, dimensions, meta)
    try:
        return job.future.result()
    except BaseException:
        job.cancelled.set()  # a no-op once it has ended
        raise


async def arun(pool: Any, inputs: Inputs, model: str | None = None, *, truncate: bool = False,
               dimensions: int | None = None, meta: dict | RequestContext | None = None) -> Embedded:
    """:func:`run` without blocking the running event loop (tokenization runs in its executor)."""
    loop = asyncio.get_running_loop()
    job = await loop.run_in_executor(None, lambda: _submit(pool, inputs, model, truncate, dimensions, meta))
    try:
        return await asyncio.wrap_future(job.future)
    except asyncio.CancelledError:  # the caller left (an HTTP client that disconnected): its rows stop
        job.cancelled.set()
        raise


def single(inputs: Inputs, vectors: np.ndarray) -> np.ndarray:
    """One vector for one text (a string or one token-id list), else the matrix."""
    one = isinstance(inputs, str) or (isinstance(inputs, list) and bool(inputs)
                                      and all(isinstance(t, int) for t in inputs))
    return vectors[0] if one else vectors
