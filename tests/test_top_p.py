"""The top-p filter that sorts only the tokens that can be kept keeps exactly the tokens mlx-lm's keeps."""

import itertools

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import apply_top_p as reference

from mlx_manager_nb.params import GenParams, make_sampler
from mlx_manager_nb.top_p import apply_top_p


def logprobs(rows: int, vocab: int, spread: float, seed: int) -> mx.array:
    logits = mx.random.normal((rows, vocab), key=mx.random.key(seed)) * spread
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


@pytest.mark.parametrize("vocab, spread", [(2, 1.0), (5, 0.5), (8, 3.0), (64, 0.1), (49152, 1.0), (49152, 4.0)])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99, 0.999])
def test_the_same_tokens_are_kept_as_mlx_lms(vocab, spread, top_p):
    """Flat and peaked rows, from two tokens to a real vocabulary, keep the same tokens with the same
    values. Over 49,152 tokens mlx-lm's float32 running sum of the sorted probabilities rounds (ours sums
    them pairwise), which can move the boundary by a token or a few: what differs holds < 0.001 of the mass."""
    lp = logprobs(16, vocab, spread, seed=vocab + int(spread * 10))
    ours, theirs = apply_top_p(lp, top_p), reference(lp, top_p)
    differ = mx.isinf(ours) != mx.isinf(theirs)
    if vocab < 1000:
        assert not mx.any(differ).item()
    assert mx.max(mx.sum(mx.where(differ, mx.exp(lp), 0), axis=-1)).item() < 1e-3
    both = mx.logical_not(mx.isinf(ours) | mx.isinf(theirs))
    assert mx.array_equal(mx.where(both, ours, 0), mx.where(both, theirs, 0)).item()
    assert mx.sum(both).item() >= 16  # every row keeps its most likely token


def test_every_ordering_of_small_distributions_and_ties():
    """Exhaustively: every permutation of distributions with ties and values at a kept-mass boundary."""
    for probs in ([0.5, 0.25, 0.125, 0.125], [0.4, 0.3, 0.3, 0.0], [0.25] * 4, [0.7, 0.1, 0.1, 0.1]):
        rows = mx.log(mx.array(list(itertools.permutations(probs))))
        for top_p in (0.1, 0.25, 0.5, 0.6, 0.75, 0.8, 0.9, 1.0):
            assert mx.array_equal(mx.isinf(apply_top_p(rows, top_p)), mx.isinf(reference(rows, top_p))).item()


def test_sampled_tokens_follow_the_filtered_distribution():
    """The sampler (temperature 1, top-p 0.8) draws the tokens mlx-lm's filter keeps, in their proportions."""
    probs = mx.array([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]])
    sample = make_sampler(GenParams(temperature=1.0, top_p=0.8, seed=7))
    draws = 6000
    counts = [0] * 6
    rows = mx.log(mx.broadcast_to(probs, (500, 6)))
    for token in mx.concatenate([sample(rows) for _ in range(draws // 500)]).tolist():
        counts[token] += 1
    kept = mx.logical_not(mx.isinf(reference(mx.log(probs), 0.8)))[0].tolist()
    assert kept == [True, True, True, False, False, False]
    expected = [0.4 / 0.8, 0.25 / 0.8, 0.15 / 0.8, 0, 0, 0]
    for c, e in zip(counts, expected, strict=True):
        assert abs(c / draws - e) < 0.03  # ~4.6 standard errors at 6,000 draws
