"""Top-p (nucleus) filtering that sorts only the tokens that can be kept, equal to mlx-lm's ``apply_top_p``.

mlx-lm sorts the whole vocabulary for every row and step (49,152 logits: ~4 ms a row on one core of
this machine, a third of a one-stream step when the machine is busy). But a token whose probability
is below ``(1 - top_p) / vocabulary`` of the total can never be kept: all such tokens together hold
less than ``1 - top_p`` of the mass, so the mass above any of them already exceeds ``top_p``. They
are set to ``-inf`` before the sort (whose cost falls with the tokens left: typically a few hundred
of 49,152) and the total mass is taken from every token, so the threshold, and the tokens kept, are
mlx-lm's up to float32 rounding: mlx-lm adds the sorted probabilities one by one, this sums them
pairwise, so at the boundary a token or a few (under 0.001 of the mass in tests/test_top_p.py) can
fall on the other side. Nothing is read back to Python: mlx-lm's pipelining stays intact.
"""

from __future__ import annotations

import math

import mlx.core as mx

#: The cutoff is lowered by this factor, so rounding never drops a token mlx-lm would keep.
MARGIN = 0.5


def apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """``logprobs`` (rows x vocabulary) with the tokens outside the top-``top_p`` mass set to ``-inf``."""
    probs = mx.exp(logprobs.astype(mx.float32))
    total = probs.sum(axis=-1, keepdims=True)
    floor = mx.log(total * ((1 - top_p) * MARGIN / logprobs.shape[-1]))
    candidates = mx.where(logprobs.astype(mx.float32) >= floor, logprobs, -math.inf)
    sorted_logprobs = mx.sort(candidates, axis=-1)
    sorted_probs = mx.exp(sorted_logprobs.astype(mx.float32))
    mass_above = mx.cumsum(sorted_probs, axis=-1, reverse=True, inclusive=False)
    num_dropped = (mass_above >= top_p * total).sum(axis=-1, keepdims=True)
    threshold = mx.take_along_axis(sorted_logprobs, num_dropped, axis=-1)
    return mx.where(logprobs < threshold, -float("inf"), logprobs)
