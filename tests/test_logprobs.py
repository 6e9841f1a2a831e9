"""Per-token log-probabilities, from the Python API and OpenAI's chat over HTTP, on the tiny model:
they equal the model's own distribution computed here from its logits."""

import math
import threading

import mlx.core as mx
import openai
import pytest
from helpers import wait_for

from mlx_manager_nb.errors import InvalidParameterError
from mlx_manager_nb.server import serve

HI = [{"role": "user", "content": "Hi"}]
LONG_TEXT = {"type": "object", "properties": {"text": {"type": "string", "minLength": 150, "maxLength": 160}},
             "required": ["text"], "additionalProperties": False}
ANSWER = {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]}},
          "required": ["answer"], "additionalProperties": False}


@pytest.fixture(scope="module")
def pool(tiny_module_pool):
    return tiny_module_pool


@pytest.fixture(scope="module")
def client(pool):
    s = serve(pool, port=0, mode="thread")
    yield openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    s.stop(drain=0)


def model_logprobs(pool, messages, generated):
    """The model's next-token log-probabilities at each generated position (a row per token), computed
    here: one forward pass over the prompt and the generated tokens, then log_softmax."""
    runner = pool.engine.runner("tiny-llama")
    prompt = list(runner.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def forward():
        logits = runner.model(mx.array([prompt + generated]))[0].astype(mx.float32)
        rows = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return rows[len(prompt) - 1: len(prompt) - 1 + len(generated)].tolist()

    return pool.engine.run(forward).result()


def text_of(entries):
    """The text the tokens' bytes spell."""
    return bytes(b for e in entries for b in e.bytes).decode("utf-8", "replace")


def same(a, b):
    """Whether two runs reported the same tokens, alternatives and log-probabilities (to 1e-4: a batch
    computes in another order)."""
    def flat(entries):
        return [(e.id, [t.id for t in e.top_logprobs]) for e in entries], \
            [v for e in entries for v in (e.logprob, *(t.logprob for t in e.top_logprobs))]

    (ids_a, values_a), (ids_b, values_b) = flat(a), flat(b)
    return ids_a == ids_b and values_a == pytest.approx(values_b, abs=1e-4)


@pytest.mark.parametrize("temperature", [0, 1.5])
def test_logprobs_are_the_models_distribution_before_temperature(pool, temperature):
    r = pool.chat(HI, temperature=temperature, seed=3, max_tokens=12, logprobs=True, top_logprobs=5)
    assert len(r.logprobs) == r.usage.completion_tokens
    assert text_of(r.logprobs) == r.text
    rows = model_logprobs(pool, HI, [e.id for e in r.logprobs])
    for entry, row in zip(r.logprobs, rows, strict=True):
        assert entry.logprob == pytest.approx(row[entry.id], abs=1e-4)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token  # a token may hold part of a character
        best = sorted(range(len(row)), key=lambda i: -row[i])[:5]
        assert [t.id for t in entry.top_logprobs] == best  # the top 5, best first
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([row[i] for i in best], abs=1e-4)
        if temperature == 0:  # greedy: the token is the most likely one
            assert entry.top_logprobs[0].id == entry.id and entry.top_logprobs[0].logprob == entry.logprob


def test_streamed_equals_not_streamed_and_plain_requests_pay_nothing(pool):
    r = pool.chat(HI, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    s = pool.chat(HI, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3, stream=True)
    assert "".join(s) == r.text and same(s.logprobs, r.logprobs) and same(s.result.logprobs, r.logprobs)
    plain = pool.chat(HI, temperature=0, max_tokens=12)
    assert plain.logprobs is None and plain.text == r.text
    bare = pool.chat(HI, temperature=0, max_tokens=12, logprobs=True)  # no alternatives asked
    assert [e.top_logprobs for e in bare.logprobs] == [[]] * len(bare.logprobs)
    assert [e.logprob for e in bare.logprobs] == pytest.approx([e.logprob for e in r.logprobs], abs=1e-5)


def test_a_request_with_logprobs_beside_plain_ones_changes_nothing_for_them(pool):
    alone = pool.chat(HI, temperature=0, max_tokens=24).text
    reported = pool.chat(HI, temperature=0, max_tokens=24, logprobs=True, top_logprobs=20).logprobs
    results = {}

    def run(key, **kw):
        results[key] = pool.chat(HI, temperature=0, max_tokens=24, **kw)

    threads = [threading.Thread(target=run, args=(f"p{i}",)) for i in range(3)]
    threads += [threading.Thread(target=run, args=("lp",), kwargs=dict(logprobs=True, top_logprobs=20))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[f"p{i}"].text for i in range(3)] == [alone] * 3
    assert all(results[f"p{i}"].logprobs is None for i in range(3))
    assert results["lp"].text == alone and same(results["lp"].logprobs, reported)  # batched, prefilled in slices


@pytest.mark.parametrize("params", [{}, {"schema": LONG_TEXT}], ids=["text", "grammar"])
def test_a_stream_parked_unread_reports_the_same_logprobs(pool, params):
    ask = dict(max_tokens=200, temperature=0, logprobs=True, top_logprobs=2, **params)
    expected = pool.chat(HI, **ask)
    s = pool.chat(HI, stream=True, **ask)
    assert wait_for(lambda: len(pool.engine.runner("tiny-llama").parked) == 1)  # left the batch, then rejoins
    assert "".join(s) == expected.text and same(s.result.logprobs, expected.logprobs)
    assert len(s.result.logprobs) == expected.usage.completion_tokens > 60


def test_a_constrained_request_reports_the_masked_distribution(pool):
    r = pool.chat(HI, schema=ANSWER, temperature=0, max_tokens=30, logprobs=True, top_logprobs=20)
    assert r.parsed["answer"] in ("yes", "no", "maybe") and text_of(r.logprobs) == r.text
    rows = model_logprobs(pool, HI, [e.id for e in r.logprobs])
    raised = 0
    for entry, row in zip(r.logprobs, rows, strict=True):
        alternatives = entry.top_logprobs
        assert all(math.isfinite(t.logprob) for t in alternatives)  # the grammar's forbidden tokens are not listed
        total = sum(math.exp(t.logprob) for t in alternatives)
        if len(alternatives) < 20:  # every allowed token is listed: renormalized, they sum to 1
            assert total == pytest.approx(1, abs=1e-4)
        assert entry.logprob >= row[entry.id] - 1e-4  # masking only moves mass to the allowed tokens
        raised += entry.logprob > row[entry.id] + 1e-3
    assert raised  # the unmasked distribution would have said otherwise somewhere
    assert r.logprobs[0].token == "{" and r.logprobs[0].logprob == pytest.approx(0, abs=1e-5)  # the only choice


@pytest.mark.parametrize("given, field", [
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(logprobs=True, top_logprobs=-1), "top_logprobs"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(logprobs="yes"), "logprobs"),
])
def test_bad_logprobs_parameters_name_the_field(pool, given, field):
    with pytest.raises(InvalidParameterError) as caught:
        pool.chat(HI, max_tokens=2, **given)
    assert caught.value.param == field


def test_openai_chat_logprobs_typed_streamed_and_not(pool, client):
    ask = dict(model="tiny", messages=HI, temperature=0, max_tokens=12, logprobs=True, top_logprobs=4)
    r = client.chat.completions.create(**ask)
    content = r.choices[0].logprobs.content
    expected = pool.chat(HI, temperature=0, max_tokens=12, logprobs=True, top_logprobs=4).logprobs
    assert [(c.token, c.bytes) for c in content] == [(e.token, e.bytes) for e in expected]
    assert [c.logprob for c in content] == pytest.approx([e.logprob for e in expected], abs=1e-5)
    assert all(len(c.top_logprobs) == 4 and c.top_logprobs[0].logprob == c.logprob for c in content)
    assert bytes(b for c in content for b in c.bytes).decode("utf-8", "replace") == r.choices[0].message.content
    streamed = []
    for chunk in client.chat.completions.create(**ask, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [c.model_dump() for c in streamed] == [c.model_dump() for c in content]
    plain = client.chat.completions.create(model="tiny", messages=HI, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_openai_top_logprobs_over_20_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=2, logprobs=True, top_logprobs=21)
    assert caught.value.body["param"] == "top_logprobs" and "20" in caught.value.body["message"]


def test_openai_completions_logprobs_in_the_legacy_shape(pool, client):
    words = pool.engine.runner("tiny-llama").tokenizer.encode(" Paris is the capital of France")
    bias = {str(t): 50 for t in words}  # whole words, so each token's text can be found at its offset
    ask = dict(model="tiny", prompt="The capital of France", temperature=0, max_tokens=10, logprobs=3,
               logit_bias=bias)
    r = client.completions.create(**ask)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    expected = pool.complete("The capital of France", temperature=0, max_tokens=10, logprobs=True,
                             top_logprobs=3, logit_bias=bias).logprobs
    assert lp.tokens == [e.token for e in expected]
    assert lp.token_logprobs == pytest.approx([e.logprob for e in expected], abs=1e-5)
    for logprob, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 3 and max(top.values()) == pytest.approx(logprob)  # greedy: the sampled token leads
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert text.startswith(lp.tokens[0].lstrip())  # the detokenizer drops the text's leading space
    assert [text[o:o + len(t)] for t, o in zip(lp.tokens, lp.text_offset, strict=True)][1:] == lp.tokens[1:]
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(**ask, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            for key in streamed:
                streamed[key] += getattr(chunk.choices[0].logprobs, key)
    assert streamed == lp.model_dump()


@pytest.mark.parametrize("value", [21, -1, True, "3"])
def test_openai_completions_bad_logprobs_is_a_400_naming_it(client, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt="Hi", max_tokens=2, extra_body={"logprobs": value})
    assert caught.value.body["param"] == "logprobs"


def test_responses_include_output_text_logprobs_streamed_and_not(pool, client):
    ask = dict(model="tiny", input="Hi", temperature=0, max_output_tokens=12,
               include=["message.output_text.logprobs"], top_logprobs=3)
    r = client.responses.create(**ask)
    part = r.output[0].content[0]
    expected = pool.chat(HI, temperature=0, max_tokens=12, logprobs=True, top_logprobs=3).logprobs
    assert [t.token for t in part.logprobs] == [e.token for e in expected] and r.top_logprobs == 3
    assert [t.logprob for t in part.logprobs] == pytest.approx([e.logprob for e in expected], abs=1e-5)
    assert all(len(t.top_logprobs) == 3 for t in part.logprobs)
    deltas, done = [], None
    for event in client.responses.create(**ask, stream=True):
        if event.type == "response.output_text.delta":
            deltas += event.logprobs
        elif event.type == "response.output_text.done":
            done = event.logprobs
    dumped = [t.model_dump() for t in part.logprobs]
    assert [t.model_dump() for t in deltas] == dumped and [t.model_dump() for t in done] == dumped
    plain = client.responses.create(model="tiny", input="Hi", max_output_tokens=2, top_logprobs=3)
    assert plain.output[0].content[0].logprobs is None  # top_logprobs alone asks for nothing shown
