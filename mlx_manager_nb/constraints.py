"""Grammar-constrained decoding with llguidance: grammars, per-model tokenizers, per-request matchers.

A :class:`Constraint` is one request's logits processor and sampler: before each sampling step it
feeds the matcher the token sampled last, and its sampler masks every token the grammar forbids
(the masks of a step computed together), so the text is guaranteed to match. It runs inside
mlx-lm's ``BatchGenerator`` beside unconstrained requests. Once the grammar is complete only
end-of-turn tokens stay allowed, so a finished grammar ends the turn.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

import llguidance as llg
import mlx.core as mx
import numpy as np

from . import schema_limits
from .errors import InvalidParameterError
from .priority import lower_this_thread
from .schema_limits import quote

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

#: Compact JSON: no free whitespace, which a weak model can repeat until max_tokens.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
MAX_SCHEMA_DEPTH = 64  # JSON objects and arrays; pydantic's schemas (with $defs) nest about 10
MATCHERS_PER_MODEL = 64
#: llguidance's own bounds on a grammar's size and on the work of each step (its defaults), with
#: short errors: verbose ones quote the grammar and the parser's state
LIMITS = llg.LLParserLimits(verbose_errors=False)
MASK_GRACE = 0.1  # seconds of CPU a request's masks may take beyond...
MASK_PER_TOKEN = 0.01  # ...this per token (llguidance's are usually well under a millisecond)
MASK_WAIT_FLOOR = 0.02  # seconds a step waits for its masks at least (see step_begins); a busy CPU delays cheap ones
_mask_threads = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="mlx-masks")
# compiles (a grammar's first mask builds its lexer: 0.3 s for a costly one) yield the CPU to the engine
_compile_threads = ThreadPoolExecutor(2, thread_name_prefix="mlx-grammar-compiles", initializer=lower_this_thread)
_steps = threading.local()  # per engine thread: the constraints of the batch step under way


class _ModelGrammars:
    """Per model (per tokenizer): the llguidance tokenizer and compiled matchers by grammar."""

    def __init__(self, tokenizer: Any):
        hf = tokenizer._tokenizer
        backend = hf.backend_tokenizer
        eos = sorted(tokenizer.eos_token_ids)
        self.lock = threading.Lock()
        self.ll = llg.LLTokenizer(backend.to_str(), n_vocab=len(hf), eos_token=eos)
        self.matchers: OrderedDict[str, llg.LLMatcher] = OrderedDict()
        self.compiling: dict[str, threading.Event] = {}  # grammars being compiled, set once done


_models: weakref.WeakKeyDictionary[Any, _ModelGrammars] = weakref.WeakKeyDictionary()
_models_lock = threading.Lock()


def _grammars(tokenizer: Any) -> _ModelGrammars:
    """The model's grammar cache, converting its tokenizer once (slow for large vocabularies)."""
    with _models_lock:
        g = _models.get(tokenizer)
        if g is None:
            g = _models[tokenizer] = _ModelGrammars(tokenizer)
        return g


def ll_tokenizer(tokenizer: Any) -> llg.LLTokenizer:
    """llguidance's view of an mlx-lm ``TokenizerWrapper``, cached per tokenizer."""
    return _grammars(tokenizer).ll


def check_schema(schema: Any, param: str) -> dict:
    """A JSON schema, checked against the JSON Schema meta-schema; raise naming ``param`` if invalid.

    Schemas nested deeper than :data:`MAX_SCHEMA_DEPTH`, or over the caps of
    :data:`~mlx_manager_nb.schema_limits.LIMITS`, are refused first: the checks and the grammar
    recurse through them.
    """
    if not isinstance(schema, dict):
        raise InvalidParameterError(param, f"{param} must be a JSON schema object, got {type(schema).__name__}")
    if _nested_deeper(schema, MAX_SCHEMA_DEPTH):
        raise InvalidParameterError(param, f"{param} nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels deep")
    schema_limits.check_size(schema, param)
    schema_limits.check_meta(schema, param)
    return schema


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether objects and arrays in ``value`` nest more than ``limit`` levels (without recursing)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((item, depth + 1) for item in (v.values() if isinstance(v, dict) else v))
    return False


# keywords whose values are schemas that may be closed (narrowing them narrows what the parent accepts)
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_VALUES = ("items", "additionalProperties", "contains")
_SCHEMA_LISTS = ("anyOf", "prefixItems", "items")
# an object beside these may get keys from elsewhere (or holds subschemas whose narrowing can widen
# what the parent accepts, as under ``not`` and ``oneOf``): it stays open
_OPEN_BESIDE = frozenset({"allOf", "oneOf", "not", "if", "then", "else", "$ref", "dependentSchemas", "dependencies",
                          "patternProperties", "unevaluatedProperties", "additionalProperties"})


def closed_schema(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on each object that does not say.

    Grammars are built from closed schemas: what they generate still matches the schema, but a weak
    model cannot ramble on in keys nobody asked for (as XGrammar's strict mode does). Only schemas
    under ``properties``, ``items``, ``anyOf``, ``$defs`` and the like are walked, and an object stays
    open where another keyword could bring keys (``allOf``, ``$ref``, ``patternProperties``...), where
    ``required`` names a key outside ``properties``, or under ``not`` and ``oneOf``.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_schema(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_VALUES:
        if isinstance(out.get(key), dict):
            out[key] = closed_schema(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_schema(sub) for sub in out[key]]
    props = out.get("properties")
    required = out.get("required", [])
    if (out.get("type") == "object" and isinstance(props, dict) and not _OPEN_BESIDE & out.keys()
            and isinstance(required, list) and set(required) <= props.keys()):
        out["additionalProperties"] = False
    return out


def json_grammar(schema: dict, param: str) -> str:
    """The grammar of JSON text matching ``schema`` (compact, closed)."""
    check_schema(schema, param)
    try:
        return llg.LLMatcher.grammar_from_json_schema(closed_schema(schema), defaults=JSON_OPTIONS)
    except ValueError as e:  # a value llguidance cannot represent
        raise InvalidParameterError(param, f"{param} cannot be used for constrained decoding: {quote(e)}") from None


def lark_json(schema: dict) -> str:
    """``schema`` inlined in a Lark grammar (``%json {...}``), compact and closed like :func:`json_grammar`."""
    return "%json " + json.dumps({**closed_schema(schema), "x-guidance": JSON_OPTIONS})


def check_grammar(grammar: str, param: str) -> str:
    """``grammar`` if llguidance accepts it (checked without a model: a request's parser runs this, so
    the field is named in its protocol's terms); else InvalidParameterError naming ``param``."""
    schema_limits.tick(param)
    error = _grammar_error(grammar)
    if error and not error.startswith("WARNING"):
        raise InvalidParameterError(param, f"{param} cannot be used for constrained decoding: {quote(error)}")
    return grammar


@functools.lru_cache(maxsize=MATCHERS_PER_MODEL)
def _grammar_error(grammar: str) -> str:
    """llguidance's verdict on a grammar, cached: a client sends the same few tools each turn."""
    return llg.LLMatcher.validate_grammar(grammar, limits=LIMITS)


def compile_grammar(tokenizer: Any, grammar: str, param: str) -> llg.LLMatcher:
    """A fresh matcher for ``grammar``; compiled once per model (requests asking for one being
    compiled wait for it), then copied.

    Raises :class:`InvalidParameterError` naming ``param`` when llguidance refuses the grammar
    (an unsupported schema keyword, a grammar too large): never a silent fallback to free text.
    """
    schema_limits.tick(param)
    g = _grammars(tokenizer)
    while True:
        with g.lock:
            base = g.matchers.get(grammar)
            if base is not None:
                g.matchers.move_to_end(grammar)
                return base.deep_copy()
            compiling = g.compiling.get(grammar)
            if compiling is None:
                g.compiling[grammar] = threading.Event()
                break
        compiling.wait()  # then take its matcher, or compile again to name this request's field
    try:
        base = _compile_threads.submit(_compile, g, grammar, param).result()
        with g.lock:
            g.matchers[grammar] = base
            while len(g.matchers) > MATCHERS_PER_MODEL:
                g.matchers.popitem(last=False)
    finally:
        with g.lock:
            g.compiling.pop(grammar).set()
    return base.deep_copy()


def _compile(g: _ModelGrammars, grammar: str, param: str) -> llg.LLMatcher:
    error = llg.LLMatcher.validate_grammar(grammar, g.ll, limits=LIMITS)
    if error and not error.startswith("WARNING"):
        raise InvalidParameterError(param, f"{param} cannot be used for constrained decoding: {quote(error)}")
    base = llg.LLMatcher(g.ll, grammar, log_level=0, limits=LIMITS)
    base.compute_bitmask()  # the lexer builds its first states here, off the engine thread; copies share them
    if base.is_error():
        raise InvalidParameterError(param, f"{param} cannot be used for constrained decoding: "
                                           f"{quote(base.get_error())}")
    return base


class MaskBudgetError(InvalidParameterError):
    """A request's grammar took more time computing its masks than its budget allows (or llguidance's
    step limits stopped it); ``param`` names the field that gave the grammar."""


class Constraint:
    """One request's grammar: a logits processor ``(tokens, logits) -> logits`` that feeds the matcher
    the token sampled last, and :meth:`sampler`, which masks every token the grammar forbids.

    The masks of a batch step are computed together, in parallel threads (llguidance releases the
    GIL), when the first constrained sequence samples: mlx-lm calls every sequence's processors,
    then every sampler (see :func:`_fill_masks`). The step waits for them about as long as its own
    forward pass takes (see :func:`step_begins`); a mask not ready by then is :attr:`late`: its sampler
    gives a placeholder token that is never used, the engine takes the sequence out of the batch
    for that step and puts it back once the mask is ready (:meth:`ready`), so one request's slow
    grammar never holds the others' step. Each mask's CPU time counts against the request's
    budget (:data:`MASK_GRACE` plus :data:`MASK_PER_TOKEN` per token); past it, or when llguidance's
    own step limits stop the matcher, its sampler raises (:attr:`failure` says why) and the engine
    fails that request alone.

    The first call sees the prompt's last token; every later call whose history is longer first
    consumes the token sampled at the previous step (a call with the same history, as after the
    engine parks and resumes the sequence, consumes nothing). A token the grammar refuses sets
    ``error`` instead: only end-of-turn tokens stay allowed, ending the turn.
    """

    def __init__(self, matcher: llg.LLMatcher, eos_ids: list[int], param: str = "schema"):
        self.matcher = matcher
        self.param = param
        self.eos = np.array(sorted(eos_ids), dtype=np.int64)
        self.error: str | None = None
        self._seen: int | None = None  # the length of the history at the previous call
        self.mask_seconds = 0.0  # CPU time spent computing this request's masks
        self.masks = 0
        self._allowed: np.ndarray | None = None  # this step's mask, once computed
        self.failure: str | None = None  # why its masks stopped (over budget, the grammar stopped)
        self._mask: Future | None = None  # the computation of the mask for the history seen last
        self.late = False  # its mask was not ready when the step sampled: the step's token is a placeholder

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        # Queue the token history, then this step's forward pass, and read the last token through
        # the buffer protocol: it waits for that token only, not the forward pass (``tokens[-1]``
        # would be a new op queued behind it), so the masks are computed while the model runs and
        # mlx-lm's async_eval pipelining is kept (measured: 0.85 of free decoding without it).
        mx.async_eval(tokens)
        mx.async_eval(logits)
        grown = self._seen is not None and tokens.size > self._seen
        if grown and self.error is None and not self.matcher.is_stopped():
            token = int(memoryview(tokens)[-1])  # type: ignore[arg-type]  # mlx arrays are buffers
            if not self.matcher.consume_token(token):
                self.error = self.matcher.get_error() or "the grammar refused a token"
        if grown or self._seen is None:  # a new state: its mask is to be computed (else the one begun is kept)
            self._mask = None
        self._seen = tokens.size
        self._allowed = None
        _pending().append(self)
        return logits

    def budget_error(self) -> MaskBudgetError | None:
        """What this request fails with once its masks stopped (over budget, or the grammar stopped); None before."""
        return None if self.failure is None else MaskBudgetError(self.param, f"{self.param}: {self.failure}")

    def ready(self) -> bool:
        """Whether the mask for the history seen last is computed (a late one, once its thread is done)."""
        return self._mask is not None and self._mask.done()

    def sampler(self, sample: Callable[[mx.array], mx.array]) -> Callable[[mx.array], mx.array]:
        """``sample`` applied to this request's log-probabilities masked by its grammar (renormalized,
        as if the logits had been masked)."""

        def masked(logprobs: mx.array) -> mx.array:
            _fill_masks()
            error = self.budget_error()
            if error is not None:
                raise error
            if self.late:  # never used: the engine takes this sequence out of the batch for this step
                return mx.argmax(logprobs, axis=-1)
            return sample(mask_logprobs(logprobs, self._current()))

        return masked

    def _current(self) -> np.ndarray:
        """This step's allowed tokens (only end-of-turn ones once the grammar ended or refused a token)."""
        error = self.budget_error()
        if error is not None:
            raise error
        return self._allowed if self._allowed is not None else self._only_eos()

    def masks_along(self, drafts: list[int]) -> tuple[list[np.ndarray], int]:
        """For speculative decoding (see :mod:`.speculative`): how many of ``drafts`` the grammar allows in a
        row, and the masks after each of those (the first: before any); the matcher is left where it was."""
        n = self.matcher.validate_tokens(drafts) if drafts and self.error is None and not self.matcher.is_stopped() \
            else 0
        masks = []
        for i in range(n + 1):
            self._allowed = self._compute_mask()
            masks.append(self._current())
            if i < n:
                self.matcher.consume_token(drafts[i])
        if n:
            self.matcher.rollback(n)
        return masks, n

    def catch_up(self, tokens: list[int]) -> None:
        """Consume the tokens of ``tokens`` (the sequence's whole text) its processor has not seen yet."""
        self.advance(tokens[self._seen if self._seen is not None else len(tokens):])
        self._seen = len(tokens)

    def advance(self, tokens: list[int]) -> None:
        """Consume ``tokens``, generated outside the batch (a speculative step's)."""
        for token in tokens:
            if self.error is not None or self.matcher.is_stopped():
                break
            if not self.matcher.consume_token(token):
                self.error = self.matcher.get_error() or "the grammar refused a token"
        if tokens:  # a new state: a mask begun in the batch before is not its mask
            self._mask = None
        if self._seen is not None:
            self._seen += len(tokens)

    def _only_eos(self) -> np.ndarray:
        allowed = np.zeros(int(self.eos.max(initial=0)) + 1, dtype=bool)
        allowed[self.eos] = True
        return allowed

    def _compute_mask(self) -> np.ndarray | None:
        """The mask for the history seen last (on a mask thread), its CPU time counted against the budget;
        None where only end-of-turn tokens are left or the budget is spent."""
        if self.error is not None or self.matcher.is_stopped():
            return None
        started = time.thread_time()
        bits = self.matcher.compute_bitmask()
        self.mask_seconds += time.thread_time() - started
        self.masks += 1
        if self.matcher.is_error():
            self.failure = f"the grammar stopped: {quote(self.matcher.get_error())}"
        elif self.mask_seconds > MASK_GRACE + MASK_PER_TOKEN * self.masks:
            self.failure = (f"the grammar took {self.mask_seconds:.2f} s of CPU to compute masks for "
                            f"{self.masks} tokens, more than its budget ({MASK_GRACE:g} s + {MASK_PER_TOKEN:g} s "
                            "per token): simplify the schema or grammar")
        else:
            return np.unpackbits(np.frombuffer(bits, dtype=np.uint8), bitorder="little").astype(bool)
        return None


def mask_logprobs(logprobs: mx.array, allowed: np.ndarray) -> mx.array:
    """``logprobs`` with the tokens ``allowed`` does not hold masked, renormalised."""
    size = logprobs.shape[-1]
    row = np.zeros(size, dtype=bool)  # the model's vocab may exceed the tokenizer's: those stay masked
    n = min(size, allowed.size)
    row[:n] = allowed[:n]
    kept = mx.where(mx.array(row), logprobs, -mx.inf)
    return kept - mx.logsumexp(kept, axis=-1, keepdims=True)


def _pending() -> list[Constraint]:
    """The constraints of this thread's current batch step whose masks are not computed yet."""
    pending = getattr(_steps, "pending", None)
    if pending is None:
        pending = _steps.pending = []
    return pending


def step_begins(seconds: float | None) -> None:
    """Tell the masks of this (engine) thread that a batch step begins, and how long its steps take: the
    step waits for its masks until that time has passed (they are computed while its forward pass runs),
    and at least :data:`MASK_WAIT_FLOOR`; None: as long as they take."""
    _steps.deadline = None if seconds is None else time.perf_counter() + seconds


def _fill_masks() -> None:
    """Compute the masks of every constraint whose processor ran this step, in parallel, waiting for them
    as long as a step takes; those not ready by then are late (see :class:`Constraint`)."""
    pending = _pending()
    if not pending:
        return
    batch, pending[:] = list(dict.fromkeys(pending)), []  # once each, should a step have been cut short
    for c in batch:
        if c._mask is None:
            c._mask = _mask_threads.submit(c._compute_mask)
    deadline = getattr(_steps, "deadline", None)
    timeout = None if deadline is None else max(MASK_WAIT_FLOOR, deadline - time.perf_counter())
    wait([c._mask for c in batch if c._mask is not None], timeout=timeout)
    for c in batch:
        assert c._mask is not None
        c.late = not c._mask.done()
        if not c.late:
            c._allowed = c._mask.result()


def make_constraint(tokenizer: Any, grammar: str, param: str) -> Constraint:
    """A :class:`Constraint` for one request on the model of ``tokenizer``."""
    return Constraint(compile_grammar(tokenizer, grammar, param), list(tokenizer.eos_token_ids), param)
