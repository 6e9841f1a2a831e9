"""Parameter validation and stop-string matching, without a model."""

import math
import random

import mlx.core as mx
import pytest

from mlx_manager_nb.params import GenParams, fit_to_model, make_params, make_processors, make_sampler
from mlx_manager_nb.stops import StopMatcher


@pytest.mark.parametrize(
    "params, field",
    [
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": 1e400}, "temperature"),
        ({"temperature": 10**400}, "temperature"),
        ({"top_p": math.nan}, "top_p"),
        ({"min_p": math.inf}, "min_p"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"repetition_penalty": math.nan}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -math.inf}, "frequency_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"stop": "x" * 1001}, "stop"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {5: math.nan}}, "logit_bias"),
        ({"logit_bias": {"five": 1}}, "logit_bias"),
        ({"logit_bias": {-3: 1}}, "logit_bias"),
        ({"logit_bias": [5, 1]}, "logit_bias"),
    ],
)
def test_values_that_would_break_sampling_name_the_field(params, field):
    with pytest.raises(ValueError, match=field):
        make_params(**params)


def test_limits_that_are_allowed_pass():
    p = make_params(seed=2**64 - 1, stop=["x" * 1000] * 16, logit_bias={"7": -100, 3: 100},
                    presence_penalty=-2, frequency_penalty=2)
    assert p.logit_bias == ((3, 100.0), (7, -100.0))
    make_sampler(p)  # mx.random.key takes the largest seed


def test_fit_to_model_clamps_top_k_and_checks_token_ids():
    assert fit_to_model(make_params(top_k=10**9), 320).top_k == 320
    assert fit_to_model(make_params(top_k=5), 320).top_k == 5
    with pytest.raises(ValueError, match="logit_bias"):
        fit_to_model(make_params(logit_bias={320: 1}), 320)
    sample = make_sampler(fit_to_model(make_params(top_k=10**9, temperature=1, seed=1), 320))
    assert sample(mx.log(mx.ones((1, 320)) / 320)).shape == (1,)  # top_k == vocabulary: no error


def test_presence_and_frequency_penalties_follow_openai_over_generated_tokens():
    (penalize,) = make_processors(GenParams(presence_penalty=0.5, frequency_penalty=1.5), prompt_tokens=2)
    tokens = mx.array([9, 9, 5, 5, 5, 7])  # a 2-token prompt, then 5 three times and 7 once
    logits = penalize(tokens, mx.zeros((1, 10)))[0].tolist()
    assert logits[5] == pytest.approx(-(3 * 1.5 + 0.5))
    assert logits[7] == pytest.approx(-(1.5 + 0.5))
    assert logits[9] == 0 and logits[0] == 0  # prompt tokens are not penalized


def test_logit_bias_processor_adds_the_bias():
    (bias,) = make_processors(make_params(logit_bias={2: -100, 4: 3}))
    out = bias(mx.array([1]), mx.zeros((1, 6)))[0].tolist()
    assert out == [0, 0, -100, 0, 3, 0]


def _quadratic_reference(stops, chunks):
    """The former matcher, as the specification of what a linear one must return."""
    pending, out = "", []
    for text in chunks:
        pending += text
        hits = [(pending.find(s), s) for s in stops if pending.find(s) >= 0]
        if hits:
            i, s = min(hits)
            out.append((pending[:i], s))
            return out
        hold = max((n for s in stops for n in range(1, len(s)) if pending.endswith(s[:n])), default=0)
        out.append((pending[:len(pending) - hold], None))
        pending = pending[len(pending) - hold:]
    return out


def test_linear_stop_matching_returns_what_the_quadratic_one_did():
    rng = random.Random(1)
    for _ in range(3000):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) if text else []
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=False)]
        m = StopMatcher(stops)
        got = []
        for c in chunks:
            got.append(m.feed(c))
            if got[-1][1]:
                break
        assert got == _quadratic_reference(stops, chunks), (stops, chunks)


def test_a_long_stop_string_costs_linear_time():
    import time

    m = StopMatcher(["a" * 999 + "b"])
    start = time.thread_time()  # this thread's CPU time: other jobs on the machine do not count
    emitted = "".join(m.feed("aaaa")[0] for _ in range(5000))
    assert time.thread_time() - start < 0.5  # about 0.01 s; the quadratic matcher took about 2.5 s here
    assert len(m.pending) == 999 and len(emitted) == 4 * 5000 - 999  # hold back what could start the stop
