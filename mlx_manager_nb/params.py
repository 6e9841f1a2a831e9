"""Generation parameters: validation, and the per-request sampler and logits processors built from them."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    greedy_sampler,
    make_logits_processors,
)

DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class GenParams:
    """What one request asks of the sampler. ``temperature=0`` is greedy decoding."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: tuple[str, ...] = field(default_factory=tuple)


NAMES = {f.name for f in fields(GenParams)}


def _number(name: str, value: Any, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def make_params(**given: Any) -> GenParams:
    """Validate user-given parameters (None means default); raise ValueError naming the field."""
    given = {k: v for k, v in given.items() if v is not None}
    unknown = set(given) - NAMES
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(sorted(unknown))}; known: {', '.join(sorted(NAMES))}")
    if "temperature" in given and _number("temperature", given["temperature"]) < 0:
        raise ValueError(f"temperature must be >= 0, got {given['temperature']}")
    if "top_p" in given and not 0 < _number("top_p", given["top_p"]) <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {given['top_p']}")
    if "top_k" in given and _number("top_k", given["top_k"], integer=True) < 0:
        raise ValueError(f"top_k must be >= 0, got {given['top_k']}")
    if "min_p" in given and not 0 <= _number("min_p", given["min_p"]) <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {given['min_p']}")
    if "repetition_penalty" in given and _number("repetition_penalty", given["repetition_penalty"]) <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {given['repetition_penalty']}")
    if "seed" in given:
        _number("seed", given["seed"], integer=True)
    if "max_tokens" in given and _number("max_tokens", given["max_tokens"], integer=True) <= 0:
        raise ValueError(f"max_tokens must be > 0, got {given['max_tokens']}")
    if "stop" in given:
        stop = given["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {given['stop']!r}")
        given["stop"] = tuple(stop)
    return GenParams(**given)


def make_sampler(p: GenParams) -> Callable[[mx.array], mx.array]:
    """A sampler with its own random key, so a seed gives the same text alone or inside a batch."""
    if p.temperature == 0:
        return greedy_sampler
    key = [mx.random.key(p.seed if p.seed is not None else random.getrandbits(63))]

    def sample(logprobs: mx.array) -> mx.array:
        if 0 < p.top_p < 1:
            logprobs = apply_top_p(logprobs, p.top_p)
        if p.min_p > 0:
            logprobs = apply_min_p(logprobs, p.min_p)
        if p.top_k > 0:
            logprobs = apply_top_k(logprobs, p.top_k)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * (1 / p.temperature), key=sub)

    return sample


def make_processors(p: GenParams) -> list:
    if p.repetition_penalty == 1.0:
        return []
    return make_logits_processors(repetition_penalty=p.repetition_penalty)
