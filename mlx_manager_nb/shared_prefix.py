"""Shared prefixes across concurrent requests: a prompt that starts as one already being prefilled does
not compute that start again.

When a request's prompt would be prefilled in slices and it shares more than :data:`SHARED_PREFIX_MIN`
tokens beyond its own prompt-cache hit with a prompt being prefilled (eight requests with the same
system prompt arriving together), it waits for that prefill to reach the shared length, takes a copy of
its KV cache there (:func:`fork`) and prefills only its own rest. The engine owns the waiting and the
hand-over (see ``Engine._start``, ``_release``, ``_hand_over``); this module picks whom to wait for.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from .kv_disk import common_prefix

if TYPE_CHECKING:
    from .engine import _Prefill

SHARED_PREFIX_MIN = 64  # tokens a prompt must share with one being prefilled, beyond its cache hit, to wait for it


def shared_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens of prompts ``a`` and ``b`` one's prefill can give the other: those they
    share, but never either's last token (the batch computes it, for the first logits)."""
    return max(0, min(common_prefix(tuple(a), b), min(len(a), len(b)) - 1))


def pick_source(prefilling: Sequence[_Prefill], prompt: list[int], priority: int,
                held: int) -> tuple[_Prefill, int] | None:
    """The prefill to wait for and how many tokens of ``prompt`` it gives: the one sharing the most, of a
    priority no lower than ``priority`` (a lower one may wait behind others), when that is more than
    :data:`SHARED_PREFIX_MIN` beyond the ``held`` tokens the request's own cache holds."""
    best: tuple[_Prefill, int] | None = None
    for entry in prefilling:
        until = shared_length(entry.request.prompt, prompt)
        if entry.request.priority < priority or until - held <= SHARED_PREFIX_MIN:
            continue
        if entry.done > until and not can_trim_prompt_cache(entry.cache):
            continue  # past the shared part, and its cache cannot be cut back to it
        if best is None or until > best[1]:
            best = (entry, until)
    return best


def fork(cache: list[Any], held: int, at: int) -> list[Any]:
    """A copy of ``cache`` (holding ``held`` tokens) holding the first ``at`` (MLX copies on write: cheap)."""
    copied = copy.deepcopy(cache)
    if held > at:
        trim_prompt_cache(copied, held - at)
    return copied
