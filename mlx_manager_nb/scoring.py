"""Log-probabilities of given tokens: a text's own, or a continuation's given its context
(:meth:`Pool.score <mlx_manager_nb.model_pool.Pool.score>`, and the prompt of an OpenAI completion
with ``echo``).

Scoring is a prefill that keeps every position's logits. A position's distribution is ``log_softmax``
of the model's raw logits (no logits processors, no temperature: nothing is sampled there); the token
that follows is looked up in it, with the most likely alternatives. It runs on the engine thread as
one sliced job per call (see :mod:`mlx_manager_nb.slices`), never in one piece: sequences that fit a
slice share a padded forward pass, padded on the right (a causal model's positions never see what comes
after them); a longer one runs alone, in chunks sized to a slice, with its own KV cache. The prompt
cache is neither read nor written: a cached prefix's KV gives no logits for its positions, so every
position is computed.

A continuation is tokenized with its context, as the text they make together (what lm-eval does): the
tokens after the context's own are the continuation's. Where the two merge into a token across the
boundary, the continuation is tokenized apart and appended.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from .engine import Runner
from .errors import ContextLengthError, EngineError, InvalidParameterError
from .logprobs import MAX_TOP_LOGPROBS, TokenLogprob, TopLogprob, token_bytes, token_text
from .request import Image, RequestContext, python_messages
from .runner import chat_model, token_ids
from .slices import Job

FIRST_PASS_TOKENS = 64  # tokens of a call's first forward pass, before the model's speed is known
MAX_PASS_TOKENS = 1024  # tokens of one forward pass at most...
MAX_PASS_LOGITS = 1 << 26  # ...and fewer for a large vocabulary: its logits (256 MiB as float32) bound its memory
MAX_ECHO_VALUES = 1 << 19  # log-probabilities one echo gives (its tokens x (logprobs + 1)): each a few Python objects

Text = str | list[dict]  # a raw text, or chat messages (their template with the assistant's turn opened)


@dataclass(frozen=True)
class Score:
    """The log-probability of scored tokens: a continuation's given its context, or a whole text's (its
    first token, with nothing before it, is not scored).

    ``tokens``: each scored token, its log-probability and, when asked, the most likely alternatives;
    ``greedy``: every one of them was the model's most likely token there (lm-eval's ``is_greedy``).
    """

    logprob: float
    tokens: list[TokenLogprob]
    greedy: bool

    @property
    def perplexity(self) -> float:
        """``exp`` of the mean negative log-probability per scored token."""
        return math.exp(-self.logprob / len(self.tokens))


@dataclass
class _Picks:
    """One sequence's scored positions: the given token's log-probability, and the top ids and values."""

    logprobs: np.ndarray  # (n,) float32
    top_ids: np.ndarray  # (n, k) unordered
    top_values: np.ndarray  # (n, k)

    @classmethod
    def none(cls, k: int) -> _Picks:
        return cls(np.zeros(0, np.float32), np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))


@dataclass
class _Work:
    """One call's sequences: ``starts[i]`` is the first position of ``sequences[i]`` scored (at least 1)."""

    sequences: list[list[int]]
    starts: list[int]
    top: int
    finish: Callable[[BaseException | None, list[_Picks] | None], None]
    cancelled: threading.Event
    future: Future


# -- the engine job ---------------------------------------------------------------------------------------


class _Cancelled(Exception):
    """Its caller went away: the job stops."""


def _pass(model: Any, pieces: list[tuple[list[int], int, int, int]], top: int,
          cache: list[Any] | None = None) -> list[_Picks]:
    """One forward pass. Each piece is ``(sequence, start, c0, c1)``: its inputs are ``sequence[c0:c1]``
    (right-padded to the longest), whose logits at position ``j`` give the distribution of ``sequence[j + 1]``,
    picked for ``j + 1 >= start``. ``cache``: a KV cache holding ``sequence[:c0]`` (one piece only)."""
    rows = [seq[c0:c1] for seq, _, c0, c1 in pieces]
    width = max(map(len, rows))
    logits = model(mx.array([r + [0] * (width - len(r)) for r in rows]), cache=cache)
    at_row, at_column, targets, counts = [], [], [], []
    for i, (seq, start, c0, c1) in enumerate(pieces):
        positions = range(max(c0, start - 1), c1)
        at_row += [i] * len(positions)
        at_column += [j - c0 for j in positions]
        targets += [seq[j + 1] for j in positions]
        counts.append(len(positions))
    k = max(top, 1)
    if not targets:  # a chunk of a long context, before its continuation: only its KV is wanted
        mx.eval([c.state for c in cache or []])
        return [_Picks.none(k)]
    rows_picked = logits[mx.array(at_row), mx.array(at_column)].astype(mx.float32)
    logprobs = rows_picked - mx.logsumexp(rows_picked, axis=-1, keepdims=True)
    given = mx.take_along_axis(logprobs, mx.array(targets)[:, None], axis=-1)[:, 0]
    ids = mx.argmax(logprobs, axis=-1)[:, None] if k == 1 else mx.argpartition(-logprobs, kth=k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(logprobs, ids, axis=-1)
    mx.eval(given, ids, values, [c.state for c in cache or []])
    given_np, ids_np, values_np = np.array(given), np.array(ids).astype(np.int64), np.array(values)
    bounds = np.cumsum([0, *counts])
    return [_Picks(given_np[a:b], ids_np[a:b], values_np[a:b]) for a, b in itertools.pairwise(bounds)]


def _joined(parts: list[_Picks]) -> _Picks:
    return _Picks(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("logprobs", "top_ids", "top_values")))


def _job(runner: Runner, work: _Work) -> Job:
    """Score ``work``'s sequences, shortest first: as many whole ones per forward pass as a slice's time
    allows at the model's measured speed, or one too long for that in chunks, a chunk per slice."""
    budget = yield
    seqs, starts, top = work.sequences, work.starts, work.top
    picks: list[_Picks | None] = [None] * len(seqs)
    speed: float | None = None  # input tokens per second of the last pass
    most = max(1, min(MAX_PASS_TOKENS, MAX_PASS_LOGITS // runner.vocab_size))

    def allowed() -> int:
        if work.cancelled.is_set():
            raise _Cancelled
        tokens = FIRST_PASS_TOKENS if speed is None else int(speed * budget)
        return max(min(FIRST_PASS_TOKENS // 8, most), min(most, tokens))

    try:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for i in [i for i in order if starts[i] >= len(seqs[i])]:  # nothing to score (a one-token echo)
            picks[i] = _Picks.none(max(top, 1))
            order.remove(i)
        while order:
            size = allowed()
            first = order[0]
            if len(seqs[first]) - 1 > size:  # alone, in chunks, with its KV cache
                order.pop(0)
                seq, cache, parts, c0 = seqs[first], make_prompt_cache(runner.model), [], 0
                while c0 < len(seq) - 1:
                    c1 = min(len(seq) - 1, c0 + size)
                    began = time.perf_counter()
                    parts += _pass(runner.model, [(seq, starts[first], c0, c1)], top, cache)
                    speed = (c1 - c0) / max(time.perf_counter() - began, 1e-6)
                    c0 = c1
                    budget = yield
                    size = allowed()
                picks[first] = _joined(parts)
                continue
            group = [first]
            for i in order[1:]:  # sorted: the last one taken is the widest
                if (len(group) + 1) * (len(seqs[i]) - 1) > size:
                    break
                group.append(i)
            began = time.perf_counter()
            done = _pass(runner.model, [(seqs[i], starts[i], 0, len(seqs[i]) - 1) for i in group], top)
            speed = len(group) * (len(seqs[group[-1]]) - 1) / max(time.perf_counter() - began, 1e-6)
            for i, p in zip(group, done, strict=True):
                picks[i] = p
            del order[: len(group)]
            if order:
                budget = yield
    except GeneratorExit:  # the engine stopped
        work.finish(EngineError("the engine stopped"), None)
        raise
    except _Cancelled as e:
        work.finish(e, None)
        return
    except Exception as e:
        mx.clear_cache()
        work.finish(EngineError(f"scoring failed on {runner.name}: {e}"), None)
        return
    work.finish(None, [p for p in picks if p is not None])


# -- requests ---------------------------------------------------------------------------------------------


def _local_runner(pool: Any, model: str | None) -> tuple[Any, Runner]:
    """The loaded chat model ``model`` names and its runner; a model in other processes is refused."""
    info = chat_model(pool, model)
    if info.placement != "local":  # its weights are in other processes, which only generate
        raise InvalidParameterError("model", f"model {info.name!r} runs in other processes: scoring and echo need "
                                    "its logits, which only a model of this process gives")
    return info, pool.engine.runner(info.name)


def _check_length(info: Any, sequences: list[list[int]], param: str) -> None:
    """Refuse a sequence longer than the model's context, ``param`` naming it."""
    ctx = info.context_length
    for i, seq in enumerate(sequences):
        if ctx is not None and len(seq) > ctx:
            where = param if len(sequences) == 1 else f"{param}[{i}]"
            raise ContextLengthError(where, f"This model's maximum context length is {ctx} tokens, and {where} "
                                     f"is {len(seq)} tokens ({info.name}).", len(seq), ctx)


def _submit(pool: Any, info: Any, runner: Runner, sequences: list[list[int]], starts: list[int], top: int,
            context: RequestContext, content: Any, param: str) -> _Work:
    """Queue one scoring job for ``sequences`` (checked against the context length, ``param`` naming them)
    and record it."""
    _check_length(info, sequences, param)
    record = pool.begin("score", info.name, context)
    tokens = sum(map(len, sequences))

    def finish(error: BaseException | None, picks: list[_Picks] | None) -> None:
        duration = time.time() - record.started
        if isinstance(error, _Cancelled):
            outcome = dict(status="cancelled", prompt_tokens=tokens, completion_tokens=0, duration=duration)
        elif error is not None:
            outcome = record.failed(error)
        else:
            outcome = dict(status="ok", prompt_tokens=tokens, completion_tokens=0, duration=duration)
        record.end(outcome, {"prompt": content, "completion": ""})
        if error is not None:
            work.future.set_exception(error)
        else:
            work.future.set_result(picks)

    work = _Work(sequences, starts, top, finish, threading.Event(), Future())
    work.future.set_running_or_notify_cancel()
    pool.engine.add_job(_job(runner, work), context.priority)
    return work


def _entries(runner: Runner, seq: list[int], start: int, picks: _Picks, top: int) -> list[TokenLogprob]:
    """The scored tokens of ``seq`` (from ``start``) with their log-probabilities and ``top`` alternatives."""
    describe = token_bytes(runner.tokenizer)
    out = []
    for j, token in enumerate(seq[start:]):
        order = np.argsort(-picks.top_values[j], kind="stable")[:top]
        alternatives = [TopLogprob(*token_text(describe, int(picks.top_ids[j][o])), float(picks.top_values[j][o]),
                                   int(picks.top_ids[j][o])) for o in order]
        out.append(TokenLogprob(*token_text(describe, token), float(picks.logprobs[j]), token, alternatives))
    return out


def _greedy(picks: _Picks) -> bool:
    return bool(np.all(picks.logprobs >= picks.top_values.max(axis=1))) if len(picks.logprobs) else True


def _wait(work: _Work) -> list[_Picks]:
    try:
        return work.future.result()
    except BaseException:  # interrupted (a notebook's stop button): the job stops at its next slice
        work.cancelled.set()
        raise


async def _await(work: _Work) -> list[_Picks]:
    try:
        return await asyncio.wrap_future(work.future)
    except asyncio.CancelledError:
        work.cancelled.set()
        raise


def _check_top(top: Any, name: str = "top_logprobs") -> int:
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InvalidParameterError(name, f"{name} must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top!r:.40}")
    return top


# -- pool.score -------------------------------------------------------------------------------------------


def _pairs(text: Any, continuation: Any) -> tuple[list[tuple[Text, str | None]], bool]:
    """``(context, continuation)`` pairs, and whether one was asked (a Score, not a list): a single text and
    continuation pair up, a list of either goes with each of the other's, two lists pair item by item."""
    def many(value: Any) -> bool:  # a list of texts (a list of dicts is one chat)
        return isinstance(value, list) and bool(value) and not isinstance(value[0], dict)

    texts, conts = (text if many(text) else [text]), (continuation if isinstance(continuation, list) else
                                                      [continuation])
    if isinstance(continuation, list) and not continuation:
        raise InvalidParameterError("continuation", "continuation must be a string, a non-empty list of strings "
                                    "or None")
    if many(text) and isinstance(continuation, list) and len(texts) != len(conts):
        raise InvalidParameterError("continuation", f"continuation holds {len(conts)} items for {len(texts)} texts; "
                                    "two lists pair item by item")
    if len(texts) == 1:
        texts = texts * len(conts)
    elif len(conts) == 1:
        conts = conts * len(texts)
    return list(zip(texts, conts, strict=True)), not many(text) and not isinstance(continuation, list)


def _encode(runner: Runner, context: Text, continuation: str | None, where: str) -> tuple[list[int], int]:
    """A pair's tokens and the position of the first scored one (see the module's docstring)."""
    tokenizer = runner.tokenizer
    if isinstance(context, str):
        special = True
        if not context:
            raise InvalidParameterError(where, f"{where} must be a non-empty string or chat messages")
        rendered = context
    else:
        if not getattr(tokenizer, "chat_template", None):
            raise InvalidParameterError(where, f"model {runner.name!r} has no chat template: score a raw text")
        chat = python_messages(context)
        image = next((p for m in chat for p in m.parts if isinstance(p, Image)), None)
        if image is not None:
            raise InvalidParameterError(where, f"{where}: scoring takes text; {image.field} is an image")
        messages = [m.template() for m in chat]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        special = False  # the template holds them
    own = list(tokenizer.encode(rendered, add_special_tokens=special))
    if continuation is None:
        if len(own) < 2:
            raise InvalidParameterError(where, f"{where} is {len(own)} token: a text alone needs two or more "
                                        "(its first one is not scored)")
        return own, 1
    if not isinstance(continuation, str) or not continuation:
        raise InvalidParameterError("continuation", "continuation must be a non-empty string")
    whole = list(tokenizer.encode(rendered + continuation, add_special_tokens=special))
    if whole[: len(own)] == own and len(whole) > len(own):
        return whole, len(own)
    return own + list(tokenizer.encode(continuation, add_special_tokens=False)), len(own)


def _prepare(pool: Any, text: Any, continuation: Any, model: str | None, top_logprobs: int,
             meta: dict | RequestContext | None) -> tuple[Runner, _Work, list[list[int]], list[int], bool]:
    """Check and tokenize a ``pool.score`` call, then queue it (any thread but the engine's)."""
    context = pool.request_context(meta, False, None, model, "score")
    try:
        top = _check_top(top_logprobs)
        pairs, one = _pairs(text, continuation)
        info, runner = _local_runner(pool, model)
        token_bytes(runner.tokenizer)  # its first conversion (~0.3 s) here, not on the engine thread
        encoded = [_encode(runner, c, cont, "text" if one else f"text[{i}]") for i, (c, cont) in enumerate(pairs)]
        sequences, starts = [s for s, _ in encoded], [b for _, b in encoded]
        work = _submit(pool, info, runner, sequences, starts, top, context,
                       [{"text": c, "continuation": cont} for c, cont in pairs], "text")
    except Exception as e:
        pool.record_refused(e, model, context, "score")
        raise
    return runner, work, sequences, starts, one


def _scores(runner: Runner, sequences: list[list[int]], starts: list[int], picks: list[_Picks],
            top: int) -> list[Score]:
    out = []
    for seq, start, p in zip(sequences, starts, picks, strict=True):
        out.append(Score(float(p.logprobs.astype(np.float64).sum()), _entries(runner, seq, start, p, top), _greedy(p)))
    return out


def run(pool: Any, text: Any, continuation: Any = None, model: str | None = None, top_logprobs: int = 0,
        meta: dict | RequestContext | None = None) -> Score | list[Score]:
    """Score on ``pool`` (see :meth:`~mlx_manager_nb.model_pool.Pool.score`), blocking until done."""
    runner, work, sequences, starts, one = _prepare(pool, text, continuation, model, top_logprobs, meta)
    scores = _scores(runner, sequences, starts, _wait(work), top_logprobs)
    return scores[0] if one else scores


async def arun(pool: Any, text: Any, continuation: Any = None, model: str | None = None, top_logprobs: int = 0,
               meta: dict | RequestContext | None = None) -> Score | list[Score]:
    """:func:`run` without blocking the running event loop (tokenizing and the results' making run in its executor)."""
    loop = asyncio.get_running_loop()
    runner, work, sequences, starts, one = await loop.run_in_executor(
        None, lambda: _prepare(pool, text, continuation, model, top_logprobs, meta))
    picks = await _await(work)
    scores = await loop.run_in_executor(None, _scores, runner, sequences, starts, picks, top_logprobs)
    return scores[0] if one else scores


# -- the prompts of OpenAI completions with echo -----------------------------------------------------------


@dataclass(frozen=True)
class Echo:
    """A prompt as a completion with ``echo`` gives it back: its text, and when log-probabilities are asked its
    first token (never scored, nothing comes before it) and the others, scored."""

    text: str
    prompt_tokens: int
    first: TokenLogprob | None = None
    tokens: tuple[TokenLogprob, ...] = ()


def _prompt_ids(runner: Runner, prompt: str | tuple[int, ...], where: str) -> list[int]:
    if isinstance(prompt, str):
        return list(runner.tokenizer.encode(prompt))
    return token_ids(runner, prompt, where)


def _text(runner: Runner, prompt: str | tuple[int, ...]) -> str:
    return prompt if isinstance(prompt, str) else runner.tokenizer.decode(list(prompt))


def _prepare_echo(pool: Any, prompts: list[str | tuple[int, ...]], model: str, top: int | None,
                  context: RequestContext, alone: bool) -> tuple[Runner, list[list[int]], _Work | None]:
    """Tokenize and check the prompts; when log-probabilities are asked, queue their scoring (a refusal is recorded;
    ``alone``: nothing is generated, so an echo without log-probabilities records its own row)."""
    try:
        info, runner = _local_runner(pool, model)
        where = "prompt" if len(prompts) == 1 else "prompt[{}]"
        ids = [_prompt_ids(runner, p, where.format(i)) for i, p in enumerate(prompts)]
        if top is None:
            _check_length(info, ids, "prompt")
            if alone:
                pool.begin("score", info.name, context).end(
                    dict(status="ok", prompt_tokens=sum(map(len, ids)), completion_tokens=0, duration=0.0),
                    {"prompt": list(map(list, ids)), "completion": ""})
            return runner, ids, None
        values = sum(map(len, ids)) * (top + 1)
        if values > MAX_ECHO_VALUES:  # millions of objects: GBs, and the collector's pauses stall every thread
            raise InvalidParameterError("prompt", f"echo with logprobs {top} gives {values} log-probabilities "
                                        f"(prompt tokens x {top + 1}); at most {MAX_ECHO_VALUES} per request")
        token_bytes(runner.tokenizer)
        return runner, ids, _submit(pool, info, runner, ids, [1] * len(ids), top, context, list(map(list, ids)),
                                    "prompt")
    except Exception as e:
        pool.record_refused(e, model, context, "score")
        raise


def _echoes(runner: Runner, prompts: list[str | tuple[int, ...]], ids: list[list[int]],
            picks: list[_Picks] | None, top: int) -> list[Echo]:
    if picks is None:
        return [Echo(_text(runner, p), len(seq)) for p, seq in zip(prompts, ids, strict=True)]
    describe = token_bytes(runner.tokenizer)
    out = []
    for prompt, seq, p in zip(prompts, ids, picks, strict=True):
        first = TokenLogprob(*token_text(describe, seq[0]), math.nan, seq[0])
        out.append(Echo(_text(runner, prompt), len(seq), first, tuple(_entries(runner, seq, 1, p, top))))
    return out


async def echo(pool: Any, prompts: list[str | tuple[int, ...]], model: str, top: int | None,
               context: RequestContext, alone: bool = False) -> list[Echo]:
    """The prompts as a completion with ``echo`` gives them back; ``top`` (None: no log-probabilities asked):
    alternatives per token; ``alone``: the echo is the whole answer (``max_tokens: 0``). Runs off the running loop."""
    loop = asyncio.get_running_loop()
    runner, ids, work = await loop.run_in_executor(None, _prepare_echo, pool, prompts, model, top, context, alone)
    picks = await _await(work) if work is not None else None
    return await loop.run_in_executor(None, _echoes, runner, prompts, ids, picks, top or 0)
