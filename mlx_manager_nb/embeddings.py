"""Embedding models in the pool: a BERT encoder in MLX, its loading, and batched embedding.

An embedding model is a folder with a BERT ``config.json``, ``tokenizer.json`` and safetensors
weights, plus (optionally) sentence-transformers' ``modules.json`` and ``1_Pooling/config.json``
(pooling, normalization) and ``sentence_bert_config.json`` (maximum length). A
``"matryoshka_dimensions": [...]`` list in ``config.json`` declares the shorter sizes the model was
trained to be truncated to.

Callers tokenize on their own thread, then append their token ids to the model's pending list;
the first one to find the list empty schedules one flush job on the engine thread, which embeds
everything pending by then, sorted by length, in as few padded forward passes as the token budget
allows. Concurrent callers thus share forward passes; chat batching is untouched.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from tokenizers import Tokenizer

from .audit_log import audit_row, error_fields, new_request_id, utc_now
from .engine import Engine, Runner
from .errors import InvalidModelError, InvalidParameterError, ModelNotFoundError
from .store import read_config

ENCODER_TYPES = ("bert",)
POOLING_FLAGS = {  # sentence-transformers' Pooling config keys
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
}
MAX_INPUTS = 2048  # as OpenAI's /v1/embeddings
BATCH_TOKENS = 8192  # padded tokens per forward pass
MIN_FILL = 0.5  # a pass takes no sequence shorter than this fraction of its longest one

Inputs = str | list[str] | list[int] | list[list[int]]


def _bad(message: str, param: str = "input") -> InvalidParameterError:
    """A bad embedding request; ``param`` names the field at fault."""
    return InvalidParameterError(param, message)


# -- the model --------------------------------------------------------------------------------
# Module and parameter names follow Hugging Face's BertModel, so its checkpoints load as they are.


@dataclass(frozen=True)
class Spec:
    """How an encoder turns hidden states into one vector per text."""

    pooling: str  # a key of POOLING_FLAGS
    normalize: bool
    max_length: int  # tokens, special tokens included
    dimensions: int
    matryoshka: tuple[int, ...]
    vocab_size: int
    pad_id: int


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        b, n, d = x.shape

        def split(t: mx.array) -> mx.array:
            return t.reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(d // self.heads), mask=bias)
        return out.transpose(0, 2, 1, 3).reshape(b, n, d)


class _DenseNorm(nn.Module):
    def __init__(self, dims_in: int, dims_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(dims_in, dims_out)
        self.LayerNorm = nn.LayerNorm(dims_out, eps=eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float):
        super().__init__()
        self.self = _SelfAttention(hidden, heads)
        self.output = _DenseNorm(hidden, hidden, eps)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        return self.output(self.self(x, bias), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)


class _Layer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        eps = c.get("layer_norm_eps", 1e-12)
        self.attention = _Attention(c["hidden_size"], c["num_attention_heads"], eps)
        self.intermediate = _Intermediate(c["hidden_size"], c["intermediate_size"])
        self.output = _DenseNorm(c["intermediate_size"], c["hidden_size"], eps)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        a = self.attention(x, bias)
        return self.output(nn.gelu(self.intermediate.dense(a)), a)


class _Embeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])
        self.token_type_embeddings = nn.Embedding(c.get("type_vocab_size", 2), c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c.get("layer_norm_eps", 1e-12))

    def __call__(self, ids: mx.array) -> mx.array:
        positions = mx.arange(ids.shape[1])[None]
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _Encoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layer = [_Layer(c) for _ in range(c["num_hidden_layers"])]


class Bert(nn.Module):
    """A BERT encoder with its pooling: ``model(ids, mask)`` is one vector per row (not yet normalized)."""

    def __init__(self, config: dict, spec: Spec):
        super().__init__()
        self.spec = spec
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.queue = _Queue()

    def __call__(self, ids: mx.array, mask: mx.array) -> mx.array:
        x = self.embeddings(ids)
        bias = ((1.0 - mask) * -1e9).astype(x.dtype)[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return pool_hidden(x, mask, self.spec.pooling)


def pool_hidden(h: mx.array, mask: mx.array, mode: str) -> mx.array:
    """Pool hidden states ``(B, L, D)`` over the tokens ``mask`` (``(B, L)``, 1 or 0) keeps."""
    m = mask[..., None].astype(h.dtype)
    if mode == "cls":
        return h[:, 0]
    if mode == "max":
        return mx.where(m > 0, h, -1e9).max(axis=1)
    total, count = (h * m).sum(axis=1), m.sum(axis=1)
    if mode == "mean_sqrt_len":
        return total / mx.sqrt(count)
    return total / mx.maximum(count, 1e-9)


def _normalized(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


# -- loading ----------------------------------------------------------------------------------


def model_kind(path: Path) -> str:
    """``"embedding"`` for an encoder folder (a BERT config or sentence-transformers modules), else ``"chat"``."""
    encoder = read_config(path).get("model_type") in ENCODER_TYPES or (Path(path) / "modules.json").is_file()
    return "embedding" if encoder else "chat"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_spec(path: Path, config: dict | None = None) -> Spec:
    """The pooling, normalization and length limits a model folder declares (sentence-transformers' files)."""
    path = Path(path)
    config = config or read_config(path)
    modules = _read_json(path / "modules.json") or []
    types = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    pooling = _read_json(path / types.get("Pooling", "1_Pooling") / "config.json")
    mode = next((mode for mode, flag in POOLING_FLAGS.items() if pooling.get(flag)), "mean")
    if pooling.get("pooling_mode_lasttoken") or pooling.get("pooling_mode_weightedmean_tokens"):
        raise InvalidModelError(f"{path}: only cls, mean, max and mean_sqrt_len pooling are supported")
    positions = config["max_position_embeddings"]
    max_length = min(_read_json(path / "sentence_bert_config.json").get("max_seq_length") or positions, positions)
    hidden = config["hidden_size"]
    return Spec(
        pooling=mode,
        normalize="Normalize" in types if modules else True,
        max_length=max_length,
        dimensions=hidden,
        matryoshka=tuple(sorted(d for d in config.get("matryoshka_dimensions", []) if d < hidden)),
        vocab_size=config["vocab_size"],
        pad_id=config.get("pad_token_id") or 0,
    )


def max_length(path: Path) -> int | None:
    """The longest input, in tokens, the embedding model at ``path`` takes (None: its config lacks sizes)."""
    try:
        return read_spec(path).max_length
    except KeyError:
        return None


def load_runner(name: str, path: Path, progress: Callable[[str, float], None]) -> Runner:
    """Load an encoder and its tokenizer (on the engine thread), reporting progress per tensor."""
    path = Path(path)
    try:
        config = read_config(path)
        if config.get("model_type") not in ENCODER_TYPES:
            raise InvalidModelError(f"{path}: embedding models of type {config.get('model_type')!r} are not "
                                    f"supported (supported: {', '.join(ENCODER_TYPES)})")
        model = Bert(config, read_spec(path, config))
        weights: dict[str, mx.array] = {}
        for f in sorted(path.glob("*.safetensors")):
            loaded: Any = mx.load(str(f))
            weights.update({k.removeprefix("bert."): v for k, v in loaded.items()})
        flat: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
        wanted = [k for k, _ in flat]
        missing = [k for k in wanted if k not in weights]
        if missing:
            raise InvalidModelError(f"{path} lacks {len(missing)} weights of a BERT encoder, e.g. {missing[0]}")
        model.load_weights([(k, weights[k].astype(mx.float32)) for k in wanted])
        for i, (_, v) in enumerate(tree_flatten(model.parameters())):
            mx.eval(v)
            if i % 16 == 0:
                progress("loading weights", 0.1 + 0.85 * i / len(wanted))
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.no_truncation()  # sentence-transformers' tokenizer.json often pads and truncates to 128
        tokenizer.no_padding()
    except InvalidModelError:
        raise
    except Exception as e:  # shapes, JSON, safetensors and tokenizers errors all mean a bad folder
        raise InvalidModelError(f"cannot load {path}: {e}") from None
    return Runner(name, model, tokenizer)


# -- requests ---------------------------------------------------------------------------------


@dataclass
class _Job:
    """One caller's texts: token ids in, vectors out, resolved on the engine thread."""

    tokens: list[list[int]]
    dimensions: int
    finish: Callable[[_Job, BaseException | None], None]
    vectors: np.ndarray | None = None
    future: Future = field(default_factory=Future)


@dataclass
class _Queue:
    """The jobs waiting for a model's next flush."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    pending: list[_Job] = field(default_factory=list)
    scheduled: bool = False


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


def _flush(engine: Engine, runner: Runner) -> None:
    """Embed every job pending on a model (engine thread)."""
    model: Bert = runner.model
    with model.queue.lock:
        jobs, model.queue.pending, model.queue.scheduled = model.queue.pending, [], False
    try:
        if engine.runner(runner.name) is not runner:
            raise ModelNotFoundError(f"model {runner.name!r} was unloaded")
        seqs = [(job, row, ids) for job in jobs for row, ids in enumerate(job.tokens)]
        vectors = np.empty((len(seqs), model.spec.dimensions), dtype=np.float32)
        for group in _buckets([len(s[2]) for s in seqs]):
            vectors[group] = _forward(model, [seqs[i][2] for i in group])
    except Exception as e:
        mx.clear_cache()
        for job in jobs:
            job.finish(job, e)
        return
    start = 0
    for job in jobs:
        v = vectors[start: start + len(job.tokens), : job.dimensions]
        start += len(job.tokens)
        job.vectors = _normalized(v) if model.spec.normalize else v
        job.finish(job, None)


def _submit(pool: Any, inputs: Any, model: str | None, truncate: bool, dimensions: int | None,
            meta: dict | None) -> _Job:
    """Check and tokenize a request, then queue it on its model (any thread but the engine's)."""
    meta = dict(meta or {})
    try:
        info = pool.find(model, kind="embedding")
        if info.kind != "embedding":
            raise _bad(f"model {info.alias or info.name!r} is a {info.kind} model; embeddings need an "
                             f"embedding model (e.g. 'demo-embed')", "model")
        runner = pool.engine.runner(info.name)
        tokens = _tokens(runner, inputs, truncate)
        dims = _dimensions(runner.model.spec, info.alias or info.name, dimensions)
    except Exception as e:
        pool.record_refused(e, model, meta, "embed")
        raise
    request_id, started, started_at = meta.get("id") or new_request_id(), time.time(), utc_now()

    def finish(job: _Job, error: BaseException | None) -> None:
        duration = time.time() - started
        outcome = (dict(status="ok", prompt_tokens=sum(map(len, tokens)), completion_tokens=0, duration=duration)
                   if error is None else dict(error_fields(error, meta), duration=duration))
        row = audit_row(request_id, started_at, "embed", info.name, {**meta, "stream": False}, outcome)
        pool._request_ended(row, meta, {"prompt": inputs, "completion": ""})
        if error is not None:
            job.future.set_exception(error)
        else:
            assert job.vectors is not None  # _flush sets them before finishing a job without error
            job.future.set_result(Embedded(job.vectors, row["prompt_tokens"], duration))

    job = _Job(tokens, dims, finish)
    job.future.set_running_or_notify_cancel()  # a caller that gives up cannot cancel it under the engine
    pool._request_started(info.name, request_id, meta)
    queue = runner.model.queue
    with queue.lock:
        queue.pending.append(job)
        schedule, queue.scheduled = not queue.scheduled, True
    if schedule:
        pool.engine.run(_flush, pool.engine, runner)
    return job


def run(pool: Any, inputs: Inputs, model: str | None = None, *, truncate: bool = False,
        dimensions: int | None = None, meta: dict | None = None) -> Embedded:
    """Embed ``inputs`` on an embedding model of ``pool``, blocking until done."""
    return _submit(pool, inputs, model, truncate, dimensions, meta).future.result()


async def arun(pool: Any, inputs: Inputs, model: str | None = None, *, truncate: bool = False,
               dimensions: int | None = None, meta: dict | None = None) -> Embedded:
    """:func:`run` without blocking the running event loop (tokenization runs in its executor)."""
    loop = asyncio.get_running_loop()
    job = await loop.run_in_executor(None, lambda: _submit(pool, inputs, model, truncate, dimensions, meta))
    return await asyncio.wrap_future(job.future)


def single(inputs: Inputs, vectors: np.ndarray) -> np.ndarray:
    """One vector for one text (a string or one token-id list), else the matrix."""
    one = isinstance(inputs, str) or (isinstance(inputs, list) and bool(inputs)
                                      and all(isinstance(t, int) for t in inputs))
    return vectors[0] if one else vectors
