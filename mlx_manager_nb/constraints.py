"""Grammar-constrained decoding with llguidance: grammars, per-model tokenizers, per-request matchers.

A :class:`Constraint` is one request's logits processor: before each sampling step it feeds the
matcher the token sampled last and masks every token the grammar forbids, so the text is
guaranteed to match. It runs inside mlx-lm's ``BatchGenerator`` beside unconstrained requests.
Once the grammar is complete only end-of-turn tokens stay allowed, so a finished grammar ends the turn.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import jsonschema
import llguidance as llg
import mlx.core as mx
import numpy as np

from .errors import InvalidParameterError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

#: Compact JSON: no free whitespace, which a weak model can repeat until max_tokens.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
MAX_SCHEMA_DEPTH = 64  # JSON objects and arrays; pydantic's schemas (with $defs) nest about 10
MATCHERS_PER_MODEL = 64


class _ModelGrammars:
    """Per model (per tokenizer): the llguidance tokenizer and compiled matchers by grammar."""

    def __init__(self, tokenizer: Any):
        hf = tokenizer._tokenizer
        backend = hf.backend_tokenizer
        eos = sorted(tokenizer.eos_token_ids)
        self.lock = threading.Lock()
        self.ll = llg.LLTokenizer(backend.to_str(), n_vocab=len(hf), eos_token=eos)
        self.matchers: OrderedDict[str, llg.LLMatcher] = OrderedDict()


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

    Schemas nested deeper than :data:`MAX_SCHEMA_DEPTH` are refused first: the checks and the
    grammar recurse through them.
    """
    if not isinstance(schema, dict):
        raise InvalidParameterError(param, f"{param} must be a JSON schema object, got {type(schema).__name__}")
    if _nested_deeper(schema, MAX_SCHEMA_DEPTH):
        raise InvalidParameterError(param, f"{param} nests objects and arrays more than {MAX_SCHEMA_DEPTH} levels deep")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise InvalidParameterError(param, f"{param} is not a valid JSON schema: {e.message}") from None
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
    return llg.LLMatcher.grammar_from_json_schema(closed_schema(schema), defaults=JSON_OPTIONS)


def lark_json(schema: dict) -> str:
    """``schema`` inlined in a Lark grammar (``%json {...}``), compact and closed like :func:`json_grammar`."""
    return "%json " + json.dumps({**closed_schema(schema), "x-guidance": JSON_OPTIONS})


def check_grammar(grammar: str, param: str) -> str:
    """``grammar`` if llguidance accepts it (checked without a model: a request's parser runs this, so
    the field is named in its protocol's terms); else InvalidParameterError naming ``param``."""
    error = _grammar_error(grammar)
    if error and not error.startswith("WARNING"):
        raise InvalidParameterError(param, f"{param} cannot be used for constrained decoding: {error}")
    return grammar


@functools.lru_cache(maxsize=MATCHERS_PER_MODEL)
def _grammar_error(grammar: str) -> str:
    """llguidance's verdict on a grammar, cached: a client sends the same few tools each turn."""
    return llg.LLMatcher.validate_grammar(grammar)


def compile_grammar(tokenizer: Any, grammar: str, param: str) -> llg.LLMatcher:
    """A fresh matcher for ``grammar``; compiled once per model, then copied.

    Raises :class:`InvalidParameterError` naming ``param`` when llguidance refuses the grammar
    (an unsupported schema keyword, a grammar too large): never a silent fallback to free text.
    """
    g = _grammars(tokenizer)
    with g.lock:
        base = g.matchers.get(grammar)
        if base is not None:
            g.matchers.move_to_end(grammar)
            return base.deep_copy()
    error = llg.LLMatcher.validate_grammar(grammar, g.ll)
    if error and not error.startswith("WARNING"):
        raise InvalidParameterError(param, f"{param} cannot be used for constrained decoding: {error}")
    base = llg.LLMatcher(g.ll, grammar, log_level=0)
    if base.is_error():
        raise InvalidParameterError(param, f"{param} cannot be used for constrained decoding: {base.get_error()}")
    with g.lock:
        g.matchers[grammar] = base
        while len(g.matchers) > MATCHERS_PER_MODEL:
            g.matchers.popitem(last=False)
    return base.deep_copy()


class Constraint:
    """One request's grammar as a logits processor ``(tokens, logits) -> logits``.

    The first call sees the prompt's last token; every later call whose history is longer first
    consumes the token sampled at the previous step (a call with the same history, as after the
    engine parks and resumes the sequence, consumes nothing). It never raises inside the batch:
    should the matcher fail, ``error`` is set and only end-of-turn tokens stay allowed, ending the turn.
    """

    def __init__(self, matcher: llg.LLMatcher, eos_ids: list[int]):
        self.matcher = matcher
        self.eos = np.array(sorted(eos_ids), dtype=np.int64)
        self.error: str | None = None
        self._seen: int | None = None  # the length of the history at the previous call

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        # Queue the token history, then this step's forward pass, and read the last token through
        # the buffer protocol: it waits for that token only, not the forward pass (``tokens[-1]``
        # would be a new op queued behind it), so the mask is computed while the model runs and
        # mlx-lm's async_eval pipelining is kept (measured: 0.85 of free decoding without it).
        mx.async_eval(tokens)
        mx.async_eval(logits)
        grown = self._seen is not None and tokens.size > self._seen
        if grown and self.error is None and not self.matcher.is_stopped():
            token = int(memoryview(tokens)[-1])  # type: ignore[arg-type]  # mlx arrays are buffers
            if not self.matcher.consume_token(token):
                self.error = self.matcher.get_error() or "the grammar refused a token"
        self._seen = tokens.size
        size = logits.shape[-1]
        if self.error is not None or self.matcher.is_stopped():
            allowed = np.zeros(size, dtype=bool)
            allowed[self.eos[self.eos < size]] = True
        else:
            bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = np.zeros(size, dtype=bool)  # the model's vocab may exceed the tokenizer's: those stay masked
            n = min(size, bits.size)
            allowed[:n] = bits[:n]
        return mx.where(mx.array(allowed), logits, -mx.inf)


def make_constraint(tokenizer: Any, grammar: str, param: str) -> Constraint:
    """A :class:`Constraint` for one request on the model of ``tokenizer``."""
    return Constraint(compile_grammar(tokenizer, grammar, param), list(tokenizer.eos_token_ids))
