"""Generation parameters: validation, and the per-request sampler and logits processors built from them.

:func:`make_params` checks what does not depend on the model; :func:`fit_to_model` then checks
token ids against the model's vocabulary and clamps ``top_k`` to it. Both raise InvalidParameterError naming
the field, so nothing a request asks for can make the shared batch step fail.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    greedy_sampler,
    make_logits_processors,
)

from .errors import InvalidParameterError
from .logprobs import MAX_TOP_LOGPROBS
from .top_p import apply_top_p

DEFAULT_MAX_TOKENS = 512
MAX_STOPS = 16  # stop strings per request
MAX_STOP_CHARS = 1000  # characters per stop string
MAX_LOGIT_BIAS = 100.0  # |bias| per token, as in OpenAI's API
MAX_PENALTY = 2.0  # |presence_penalty| and |frequency_penalty|, as in OpenAI's API
MAX_SEED = 2**64 - 1  # mx.random.key takes an unsigned 64-bit seed

Processor = Callable[[mx.array, mx.array], mx.array]


NUMBER = {"json": (int, float)}  # each field's JSON types, as request bodies carry it
INTEGER = {"json": int}


@dataclass(frozen=True)
class GenParams:
    """What one request asks of the sampler. ``temperature=0`` is greedy decoding.

    ``logit_bias`` holds (token id, bias) pairs, added to the logits before sampling.
    ``presence_penalty`` and ``frequency_penalty`` follow OpenAI: a token's logit drops by
    ``frequency_penalty * count + presence_penalty * (count > 0)``, counting the tokens generated so far.
    ``max_tokens`` None: up to :data:`DEFAULT_MAX_TOKENS`, within the model's context.
    ``logprobs``: report each token's log-probability (see :mod:`mlx_manager_nb.logprobs`), with the
    ``top_logprobs`` most likely alternatives (0 to :data:`MAX_TOP_LOGPROBS`).
    ``speculative``: False keeps the request off speculative decoding (see :mod:`mlx_manager_nb.speculative`).
    """

    temperature: float = field(default=0.7, metadata=NUMBER)
    top_p: float = field(default=1.0, metadata=NUMBER)
    top_k: int = field(default=0, metadata=INTEGER)
    min_p: float = field(default=0.0, metadata=NUMBER)
    repetition_penalty: float = field(default=1.0, metadata=NUMBER)
    presence_penalty: float = field(default=0.0, metadata=NUMBER)
    frequency_penalty: float = field(default=0.0, metadata=NUMBER)
    logit_bias: tuple[tuple[int, float], ...] = field(default=(), metadata={"json": dict})
    seed: int | None = field(default=None, metadata=INTEGER)
    max_tokens: int | None = field(default=None, metadata=INTEGER)
    stop: tuple[str, ...] = field(default=(), metadata={"json": (str, list)})
    logprobs: bool = field(default=False, metadata={"json": bool})
    top_logprobs: int = field(default=0, metadata=INTEGER)
    speculative: bool = field(default=True, metadata={"json": bool})

    @property
    def limit(self) -> int:
        """The most tokens to generate."""
        return DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens


NAMES = {f.name for f in fields(GenParams)}
JSON_TYPES = {f.name: f.metadata["json"] for f in fields(GenParams)}


def json_fields(p: GenParams) -> dict[str, Any]:
    """``p``'s fields that differ from the defaults, as JSON values (``logit_bias`` as an object)."""
    out = {f.name: getattr(p, f.name) for f in fields(p) if getattr(p, f.name) != f.default}
    if "logit_bias" in out:
        out["logit_bias"] = {str(token): bias for token, bias in p.logit_bias}
    if "stop" in out:
        out["stop"] = list(p.stop)
    return out


def _short(value: Any) -> str:
    """A value as an error message may quote it: its repr, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _number(name: str, value: Any, integer: bool = False) -> float:
    """``value`` if it is a finite number (an int when ``integer``); else InvalidParameterError naming ``name``."""
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        kind = "an integer" if integer else "a number"
        raise InvalidParameterError(name, f"{name} must be {kind}, got {_short(value)}")
    if not integer:
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            raise InvalidParameterError(name, f"{name} must be a finite number, got {_short(value)}")
    return value


def _stops(value: Any, name: str) -> tuple[str, ...]:
    stop = [value] if isinstance(value, str) else value
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidParameterError(name, f"{name} must be a non-empty string or a list of them, got {_short(value)}")
    if len(stop) > MAX_STOPS:
        raise InvalidParameterError(name, f"{name} takes at most {MAX_STOPS} strings, got {len(stop)}")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise InvalidParameterError(name, f"each {name} string must be at most {MAX_STOP_CHARS} characters, "
                         f"got one of {max(len(s) for s in stop)}")
    return tuple(stop)


def _logit_bias(value: Any, name: str) -> tuple[tuple[int, float], ...]:
    """A {token id: bias} mapping (ids may be decimal strings, as JSON keys are) as sorted pairs."""
    if not isinstance(value, dict):
        raise InvalidParameterError(name,
                                    f"{name} must be an object mapping token ids to biases, got {_short(value)}")
    out = {}
    for key, bias in value.items():
        token = key
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            token = int(key)
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise InvalidParameterError(name, f"{name} keys must be token ids (integers >= 0), got {_short(key)}")
        if not -MAX_LOGIT_BIAS <= _number(f"{name}[{key!r}]", bias) <= MAX_LOGIT_BIAS:
            raise InvalidParameterError(name, f"{name}[{_short(key)}] must be in "
                                        f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias}")
        out[token] = float(bias)
    return tuple(sorted(out.items()))


#: field -> (check of a given value, what it must be): a value that fails names the field
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "temperature": (lambda v: v >= 0, ">= 0"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v >= 0, ">= 0"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "> 0"),
    "presence_penalty": (lambda v: -MAX_PENALTY <= v <= MAX_PENALTY, f"in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
    "frequency_penalty": (lambda v: -MAX_PENALTY <= v <= MAX_PENALTY, f"in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]"),
    "seed": (lambda v: 0 <= v <= MAX_SEED, "an integer in [0, 2**64 - 1]"),
    "max_tokens": (lambda v: v > 0, "> 0"),
    "top_logprobs": (lambda v: 0 <= v <= MAX_TOP_LOGPROBS, f"in [0, {MAX_TOP_LOGPROBS}]"),
}
INTEGERS = ("top_k", "seed", "max_tokens", "top_logprobs")


def make_params(names: Mapping[str, str] | None = None, /, **given: Any) -> GenParams:
    """Validate user-given parameters (None means default); raise InvalidParameterError naming the field,
    as ``names`` maps it (a protocol's own name for it, e.g. ``{"stop": "stop_sequences"}``)."""
    names = names or {}
    given = {k: v for k, v in given.items() if v is not None}
    unknown = set(given) - NAMES
    if unknown:
        raise InvalidParameterError(min(unknown),
                                    f"unknown parameter(s): {_short(sorted(unknown))}; "
                                    f"known: {', '.join(sorted(NAMES))}")
    for field_name, (ok, what) in RANGES.items():
        if field_name in given:
            name = names.get(field_name, field_name)
            if not ok(_number(name, given[field_name], integer=field_name in INTEGERS)):
                raise InvalidParameterError(name, f"{name} must be {what}, got {given[field_name]}")
    if "stop" in given:
        given["stop"] = _stops(given["stop"], names.get("stop", "stop"))
    if "logit_bias" in given:
        given["logit_bias"] = _logit_bias(given["logit_bias"], names.get("logit_bias", "logit_bias"))
    _check_logprobs(given, names)
    if not isinstance(given.get("speculative", True), bool):
        name = names.get("speculative", "speculative")
        raise InvalidParameterError(name, f"{name} must be true or false, got {_short(given['speculative'])}")
    return GenParams(**given)


def _check_logprobs(given: dict[str, Any], names: Mapping[str, str]) -> None:
    """``logprobs`` must be a bool, and true when ``top_logprobs`` asks for alternatives (as OpenAI has it)."""
    name = names.get("logprobs", "logprobs")
    if not isinstance(given.get("logprobs", False), bool):
        raise InvalidParameterError(name, f"{name} must be true or false, got {_short(given['logprobs'])}")
    if given.get("top_logprobs") and not given.get("logprobs"):
        top = names.get("top_logprobs", "top_logprobs")
        raise InvalidParameterError(top, f"{top} needs {name} to be true")


def fit_to_model(p: GenParams, vocab_size: int) -> GenParams:
    """Check ``p`` against a model with ``vocab_size`` tokens: ``top_k`` is clamped to it, and
    ``logit_bias`` ids beyond it raise InvalidParameterError."""
    for token, _ in p.logit_bias:
        if token >= vocab_size:
            raise InvalidParameterError("logit_bias",
                                        f"logit_bias key {token} is not a token id of this model "
                                        f"(vocabulary of {vocab_size})")
    return replace(p, top_k=vocab_size) if p.top_k > vocab_size else p


def make_sampler(p: GenParams) -> Callable[[mx.array], mx.array]:
    """A sampler with its own random key, so a seed gives the same text alone or inside a batch."""
    if p.temperature == 0:
        return greedy_sampler
    key = [mx.random.key(p.seed if p.seed is not None else random.getrandbits(63))]

    def sample(logprobs: mx.array) -> mx.array:
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(filtered(logprobs, p) * (1 / p.temperature), key=sub)

    return sample


def filtered(logprobs: mx.array, p: GenParams) -> mx.array:
    """``logprobs`` with the tokens ``p``'s ``top_p``, ``min_p`` and ``top_k`` leave out set to ``-inf``: what
    its sampler draws from, before the temperature."""
    if 0 < p.top_p < 1:
        logprobs = apply_top_p(logprobs, p.top_p)
    if p.min_p > 0:
        logprobs = apply_min_p(logprobs, p.min_p)
    if 0 < p.top_k < logprobs.shape[-1]:  # top_k == vocabulary size keeps every token
        logprobs = apply_top_k(logprobs, p.top_k)
    return logprobs


def _openai_penalties(prompt_tokens: int, presence: float, frequency: float) -> Processor:
    """OpenAI's presence and frequency penalties over the tokens generated after ``prompt_tokens``."""

    def penalize(tokens: mx.array, logits: mx.array) -> mx.array:
        generated = tokens[prompt_tokens:]
        if generated.size == 0:
            return logits
        if frequency:
            logits = logits.at[:, generated].subtract(frequency)  # repeated ids subtract once each
        if presence:
            logits[:, generated] = logits[:, generated] - presence  # repeated ids write the same value
        return logits

    return penalize


def make_processors(p: GenParams, prompt_tokens: int = 0) -> list[Processor]:
    """The logits processors ``p`` asks for; ``prompt_tokens`` is the prompt's length (for the penalties)."""
    processors = []
    if p.logit_bias:
        processors += make_logits_processors(logit_bias=dict(p.logit_bias))
    if p.repetition_penalty != 1.0:
        processors += make_logits_processors(repetition_penalty=p.repetition_penalty)
    if p.presence_penalty or p.frequency_penalty:
        processors.append(_openai_penalties(prompt_tokens, p.presence_penalty, p.frequency_penalty))
    return processors
