"""Per-token log-probabilities of the distribution each token was sampled from.

What is reported, as OpenAI reports it: the model's next-token distribution, ``log_softmax`` of the
logits after the request's logits processors (``logit_bias``, the repetition, presence and
frequency penalties) and before temperature, ``top_p``, ``top_k`` and ``min_p``, so a token's
log-probability does not change with the temperature it was sampled at. Under a grammar (a schema,
``response_format``) the distribution is the masked one, renormalized: only tokens the grammar
allows have a log-probability, alternatives included, and theirs sum to 1.

A :class:`Recorder` wraps one sequence's sampler (inside the grammar's mask), picks the sampled
token's and the top alternatives' log-probabilities from each row it sees, and on the engine
thread turns each pick into a :class:`TokenLogprob` as its token is reported: requests that do not
ask never pay for it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI allows


@dataclass(frozen=True)
class TopLogprob:
    """One alternative at a position: its text, log-probability and UTF-8 bytes (a token may hold
    part of a character)."""

    token: str
    bytes: list[int]
    logprob: float
    id: int


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token: its text, log-probability, bytes and the most likely alternatives (best first)."""

    token: str
    bytes: list[int]
    logprob: float
    id: int
    top_logprobs: list[TopLogprob] = field(default_factory=list)


def openai_logprobs(entries: list[TokenLogprob]) -> list[dict]:
    """``entries`` as OpenAI's chat ``logprobs.content`` and the Responses API's ``output_text.logprobs`` list them."""
    return [{"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
             "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in e.top_logprobs]}
            for e in entries]


def token_bytes(tokenizer: Any) -> Callable[[int], bytes]:
    """A token id's bytes under ``tokenizer`` (an mlx-lm ``TokenizerWrapper``), as llguidance decodes them."""
    from .constraints import ll_tokenizer

    ll = ll_tokenizer(tokenizer)
    return lambda token: ll.decode_bytes([token])


def token_text(describe: Callable[[int], bytes], token: int) -> tuple[str, list[int]]:
    """A token's text (undecodable bytes replaced) and its bytes, as a :class:`TokenLogprob` holds them."""
    raw = describe(token)
    return raw.decode("utf-8", "replace"), list(raw)


class Recorder:
    """One sequence's log-probabilities: :meth:`wrap` its sampler, :meth:`take` one per reported token.

    Each sampler call sees one step's log-probabilities; the sampled token's and the top
    alternatives' are picked from that row in the same step's computation (no extra sync on the
    engine thread). The batch reports that step's token a step later, so picks wait in order until taken.
    """

    def __init__(self, top: int, describe: Callable[[int], bytes]):
        self.top, self.describe = top, describe
        self.picks: deque[tuple[mx.array, mx.array]] = deque()  # (logprobs of the token and the top ids, top ids)

    def wrap(self, sample: Callable[[mx.array], mx.array]) -> Callable[[mx.array], mx.array]:
        def recording(logprobs: mx.array) -> mx.array:
            token = sample(logprobs)
            self.record(logprobs[0], token)
            return token

        return recording

    def record(self, row: mx.array, token: mx.array) -> None:
        """Pick ``token``'s and the top alternatives' log-probabilities from ``row`` (one position's)."""
        top_k = min(self.top, row.shape[0])
        ids = mx.argpartition(-row, kth=top_k - 1)[:top_k] if top_k else mx.array([], dtype=mx.uint32)
        picked = row[mx.concatenate([token.reshape(-1)[:1].astype(ids.dtype), ids])].astype(mx.float32)
        mx.async_eval(picked, ids)
        self.picks.append((picked, ids))

    def clear(self) -> None:
        """Forget picks whose tokens will not be reported (the sequence left the batch)."""
        self.picks.clear()

    def take(self, token: int) -> TokenLogprob:
        """The oldest pick: ``token``, the token sampled at that step, and its alternatives."""
        picked, ids = self.picks.popleft()
        logprobs: list[float] = picked.tolist()  # type: ignore[assignment]  # a 1-d array's list
        alternatives: list[int] = ids.tolist()  # type: ignore[assignment]
        pairs = sorted(zip(logprobs[1:], alternatives, strict=True), key=lambda p: -p[0])
        top = [TopLogprob(*self._text(i), v, i) for v, i in pairs if v != float("-inf")]  # -inf: masked by a grammar
        return TokenLogprob(*self._text(token), logprobs[0], token, top)

    def _text(self, token: int) -> tuple[str, list[int]]:
        return token_text(self.describe, token)
