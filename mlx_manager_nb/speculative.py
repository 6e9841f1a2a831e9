"""Speculative decoding of a model's one sequence: drafted tokens verified in one forward pass.

When a model decodes a single sequence, a step reads every weight for one row of activations, so
``k + 1`` rows cost about what one does. The engine then takes that sequence out of its batch (see
``Engine._go_solo``) and decodes it here, one :func:`step` per engine round: the tokens drafted after
its last one, taken from the prompt and the text so far (:class:`Lookup`, an n-gram match: no draft
model) or from a smaller draft model of the same tokenizer (:class:`DraftModel`), are run through the
model with it, and as many are kept as the model agrees with, plus one of its own.

Acceptance: greedy keeps a drafted token where it is the model's argmax, so the text is the one
plain decoding gives. Sampled decoding follows speculative sampling for a point-mass draft (both
drafters propose one token, not a distribution): drafted ``t`` is kept with probability ``p(t)``,
else the token is drawn from ``p`` without ``t``, renormalised, so every token is drawn from ``p``
(see :func:`accept_sampled`). ``p`` is the request's own distribution: after its logits processors,
its grammar's mask (a constrained request's drafts are cut where the grammar refuses one), and its
temperature, ``top_p``, ``top_k`` and ``min_p``. A step that drafts nothing is a plain decoding step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from .constraints import mask_logprobs
from .params import GenParams, Processor, filtered

if TYPE_CHECKING:
    from .constraints import Constraint

DRAFT_TOKENS = 4  # tokens drafted per step
NGRAMS = (3, 2)  # the n-gram lengths matched at the end of the text, longest first
MISSES = 16  # draftless steps in a row after which the sequence goes back to the batch
INDEX_STEP = 4096  # text positions a draft indexes at most (a long prompt's index is built over several steps)


class Lookup:
    """Prompt-lookup drafts: the tokens that followed the latest earlier occurrence of the text's last
    n-gram. Its index grows with the text (a dict per n-gram length), at most :data:`INDEX_STEP` positions
    per draft, so a draft's work is bounded on the engine thread however long the prompt (until the index
    has caught up, it drafts from the occurrences indexed so far)."""

    def __init__(self) -> None:
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in NGRAMS}
        self._done = 0  # end positions indexed so far

    def draft(self, tokens: list[int], k: int) -> list[int]:
        """Up to ``k`` tokens likely to follow ``tokens`` (none when its last n-gram did not occur before)."""
        end = len(tokens)
        upto = min(end, self._done + INDEX_STEP)
        for n, index in self._index.items():  # n-grams ending before the last position: each has a follower
            for e in range(max(n, self._done), upto):
                index[tuple(tokens[e - n:e])] = e
        self._done = max(self._done, upto)
        for n, index in self._index.items():
            at = index.get(tuple(tokens[end - n:])) if end >= n else None
            if at is not None:
                return tokens[at:at + k]
        return []


@dataclass
class DraftModel:
    """Drafts from a smaller model of the same tokenizer, greedily; its KV cache follows the text,
    filled a chunk per step (until it has caught up, steps draft nothing)."""

    model: Any
    cache: list[Any]
    chunk: int = 512  # tokens of the text fed to it per step while it catches up
    held: int = 0  # tokens of the text its cache holds

    def draft(self, tokens: list[int], k: int) -> list[int]:
        behind = tokens[self.held:]
        if len(behind) > self.chunk:  # catching up on the prompt: bounded work per step
            self.model(mx.array([behind[:self.chunk]]), cache=self.cache)
            mx.eval([c.state for c in self.cache])
            self.held += self.chunk
            return []
        if not k:
            return []
        feed, out = mx.array([behind]), []
        for _ in range(k):  # each token queued behind the last, one synchronisation at the end
            token = mx.argmax(self.model(feed, cache=self.cache)[:, -1], axis=-1)
            mx.async_eval(token)
            out.append(token)
            feed = token[None]
        self.held += len(behind) + k - 1
        return mx.concatenate(out).tolist()  # type: ignore[return-value]

    def kept(self, length: int) -> None:
        """The text is now ``length`` tokens of which the cache holds a prefix: forget what it does not."""
        if self.held > length:
            trim_prompt_cache(self.cache, self.held - length)
            self.held = length


@dataclass
class Solo:
    """A sequence the engine decodes itself: its KV cache holds ``tokens`` but the last one."""

    uid: int
    seq: Any  # the engine's _Seq
    cache: list[Any]
    tokens: list[int]  # its prompt and the tokens generated so far
    drafter: Lookup | DraftModel
    key: mx.array | None  # its random key when it samples
    held: int = 0  # tokens the cache holds (set by go)
    misses: int = 0  # steps in a row that drafted nothing
    drafts: int = 0  # tokens the last step drafted
    rows: mx.array | None = field(default=None, repr=False)  # the last step's log-probabilities, per emitted token

    def release(self) -> tuple[list[Any], list[int]]:
        """Its KV cache, trimmed to ``tokens`` but the last, and those tokens (to leave the engine's hands)."""
        keep = len(self.tokens) - 1
        if self.held > keep:
            trim_prompt_cache(self.cache, self.held - keep)
            self.held = keep
        return self.cache, self.tokens[:keep]


def trimmable(cache: list[Any]) -> bool:
    """Whether a KV cache can give back rejected tokens (not a recurrent model's state)."""
    return can_trim_prompt_cache(cache)


def go(uid: int, seq: Any, cache: list[Any], tokens: list[int], drafter: Lookup | DraftModel,
       p: GenParams) -> Solo:
    """A :class:`Solo` for ``seq`` from the batch's cache of all of ``tokens``."""
    trim_prompt_cache(cache, 1)
    key = None if p.temperature == 0 else mx.random.key(p.seed if p.seed is not None else random.getrandbits(63))
    return Solo(uid, seq, cache, list(tokens), drafter, key, held=len(tokens) - 1)


def step(solo: Solo, model: Any, processors: list[Processor], constraint: Constraint | None, p: GenParams,
         room: int, record: bool) -> list[int]:
    """One speculative step: draft, verify, keep. Returns the tokens to emit (drafts kept, then the model's
    own), at most ``room``; the cache then holds all of them but the last. ``record``: keep each emitted
    token's log-probabilities row in ``solo.rows``."""
    drafts = solo.drafter.draft(solo.tokens, min(DRAFT_TOKENS, room - 1)) if room > 1 else []
    masks = None
    if constraint is not None:
        masks, allowed = constraint.masks_along(drafts)
        drafts = drafts[:allowed]
    solo.misses = 0 if drafts else solo.misses + 1
    solo.drafts = len(drafts)
    logits = model(mx.array([solo.tokens[-1:] + drafts]), cache=solo.cache)[0]  # in the model's dtype, as the batch
    solo.held += 1 + len(drafts)
    logprobs = _processed(logits, solo.tokens, drafts, processors, masks)
    if p.temperature == 0:
        picks: list[int] = mx.argmax(logprobs, axis=-1).tolist()  # type: ignore[assignment]
        out = _accept_greedy(picks, drafts)
    else:
        assert solo.key is not None
        solo.key, sub = mx.random.split(solo.key)
        out = accept_sampled(distribution(logprobs, p), drafts, sub)
    if isinstance(solo.drafter, DraftModel):
        solo.drafter.kept(len(solo.tokens) + len(out) - 1)
    trim_prompt_cache(solo.cache, len(drafts) + 1 - len(out))
    solo.held -= len(drafts) + 1 - len(out)
    if constraint is not None:
        constraint.advance(out)
    solo.rows = logprobs if record else None
    return out[:room]


def _processed(logits: mx.array, tokens: list[int], drafts: list[int], processors: list[Processor],
               masks: list[Any] | None) -> mx.array:
    """Each row's log-probabilities after the request's processors (row ``i`` sees the text and ``drafts[:i]``)
    and its grammar's mask."""
    if processors or masks is not None:
        rows = []
        for i in range(len(drafts) + 1):
            row = logits[i:i + 1]
            if processors:
                history = mx.array(tokens + drafts[:i])
                for processor in processors:
                    row = processor(history, row)
            if masks is not None:
                row = mask_logprobs(row, masks[i])
            rows.append(row)
        logits = mx.concatenate(rows, axis=0)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _accept_greedy(picks: list[int], drafts: list[int]) -> list[int]:
    """The drafts up to the first the model's argmax disagrees with, then the model's token there."""
    n = 0
    while n < len(drafts) and picks[n] == drafts[n]:
        n += 1
    return [*drafts[:n], picks[n]]


def distribution(logprobs: mx.array, p: GenParams) -> mx.array:
    """The probabilities the request's sampler draws each row's token from (``p``'s filters and temperature)."""
    return mx.softmax(filtered(logprobs, p) * (1 / p.temperature), axis=-1)


def accept_sampled(probs: mx.array, drafts: list[int], key: mx.array) -> list[int]:
    """Speculative sampling with point-mass drafts: ``probs`` holds ``len(drafts) + 1`` rows, row ``i`` the
    distribution of the token after ``drafts[:i]``. Draft ``i`` is kept with probability ``probs[i, d_i]``;
    at the first one refused, the token is drawn from row ``i`` without it, renormalised; when all are kept,
    from the last row. Each emitted token is thus distributed as its row."""
    ukey, skey = mx.random.split(key)
    n = len(drafts)
    if n:
        kept: list[bool] = (mx.random.uniform(shape=(n,), key=ukey)  # type: ignore[assignment]
                            < probs[mx.arange(n), mx.array(drafts)]).tolist()
        n = kept.index(False) if False in kept else n
    row = probs[n]
    if n < len(drafts):
        row = row.at[drafts[n]].multiply(0.0)
    token: int = mx.random.categorical(mx.log(row), key=skey).item()  # type: ignore[assignment]
    return [*drafts[:n], token]

