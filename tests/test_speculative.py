"""Speculative decoding (prompt lookup and a draft model) gives what plain decoding gives, on the tiny model.

The tiny model's random weights rarely repeat themselves; ``repetition_penalty`` below 1 rewards
repeating, so its greedy text falls into loops that prompt lookup drafts (each test checks drafts were
accepted, else it would compare plain decoding with itself).
"""

import json
import shutil
import threading

import mlx.core as mx
import pytest

from mlx_manager_nb import speculative
from mlx_manager_nb.errors import InvalidParameterError
from mlx_manager_nb.params import GenParams, make_params
from mlx_manager_nb.top_p import apply_top_p

PROMPTS = [
    "The capital of France is Paris. The capital of Italy is Rome. The capital of France is",
    "Hello world! Hello world! Hello world! Hello",
    "def add(a, b):\n    return a + b\ndef add(",
    "Once upon a time there was a tiny model that could talk.",
    "0123456789 0123456789 0123",
    "user assistant system: answer the question in one sentence.",
]
LOOPING = dict(repetition_penalty=0.3)  # greedy text that repeats itself: drafts get accepted


@pytest.fixture
def runner(pool):
    return pool.engine.runner(pool.find("tiny").name)


def same(a, b):
    """The same answer (the prompt cache may hold more or less of the prompt)."""
    def seen(r):
        return r.text, r.finish_reason, r.stop, r.usage.prompt_tokens, r.usage.completion_tokens
    assert seen(a) == seen(b)


def test_greedy_text_is_plain_decodings(pool, runner):
    for prompt in PROMPTS:
        for params in (LOOPING, {}, dict(logit_bias={"40": 4.0, "41": 4.0}), dict(presence_penalty=-1.5)):
            plain = pool.complete(prompt, "tiny", temperature=0, max_tokens=80, speculative=False, **params)
            same(pool.complete(prompt, "tiny", temperature=0, max_tokens=80, **params), plain)
    assert runner.accepted > 50, (runner.drafted, runner.accepted)


def test_chat_prompt_drafts_from_the_prompt(pool, runner):
    messages = [{"role": "user", "content": "Repeat: the cat sat on the mat, the cat sat on the mat, the cat"}]
    plain = pool.chat(messages, "tiny", temperature=0, max_tokens=60, speculative=False, **LOOPING)
    same(pool.chat(messages, "tiny", temperature=0, max_tokens=60, **LOOPING), plain)
    assert runner.drafted > 0


def test_opt_out_drafts_nothing(pool, runner):
    for prompt in PROMPTS[:3]:
        pool.complete(prompt, "tiny", temperature=0, max_tokens=40, speculative=False, **LOOPING)
    assert runner.drafted == 0


def test_beside_other_streams_and_across_the_switch(pool, runner):
    """A long speculative stream goes back into the batch when others come and out again when they end:
    its text is plain decoding's, and so are theirs."""
    long = PROMPTS[1]
    plain = pool.complete(long, "tiny", temperature=0, max_tokens=300, speculative=False, **LOOPING)
    others = {p: pool.complete(p, "tiny", temperature=0, max_tokens=30, speculative=False, **LOOPING) for p in PROMPTS}
    stream = pool.complete(long, "tiny", temperature=0, max_tokens=300, stream=True, **LOOPING)
    seen = threading.Event()

    def read():
        for _ in stream:
            if runner.accepted:  # it decodes speculatively: now the others come
                seen.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert seen.wait(30)
    for p in PROMPTS:  # one at a time: the long one is in the batch with each, then alone again
        same(pool.complete(p, "tiny", temperature=0, max_tokens=30, **LOOPING), others[p])
    accepted = runner.accepted
    reader.join(60)
    assert stream.result is not None
    same(stream.result, plain)
    assert runner.accepted > accepted  # and speculatively again once alone


def test_concurrent_requests_match_plain(pool, runner):
    plain = {p: pool.complete(p, "tiny", temperature=0, max_tokens=60, speculative=False, **LOOPING) for p in PROMPTS}
    results = {}

    def run(p):
        results[p] = pool.complete(p, "tiny", temperature=0, max_tokens=60, **LOOPING)

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for p in PROMPTS:
        same(results[p], plain[p])


def test_stop_string_inside_an_accepted_draft_stops_there(pool, runner):
    prompt = PROMPTS[1]
    text = pool.complete(prompt, "tiny", temperature=0, max_tokens=120, speculative=False, **LOOPING).text
    checked = 0
    for at in range(40, 110, 7):  # stops starting deep in the repeating text, where drafts are accepted
        stop = text[at:at + 3]
        if not stop.strip():
            continue
        before = runner.accepted
        r = pool.complete(prompt, "tiny", temperature=0, max_tokens=120, stop=stop, **LOOPING)
        plain = pool.complete(prompt, "tiny", temperature=0, max_tokens=120, stop=stop, speculative=False, **LOOPING)
        same(r, plain)
        assert r.finish_reason == "stop" and r.text == text[:text.index(stop)]
        checked += runner.accepted > before
    assert checked >= 3


def test_audit_counts_the_tokens_sent(pool, runner, audit):
    from helpers import wait_for

    r = pool.complete(PROMPTS[1], "tiny", temperature=0, max_tokens=70, **LOOPING)
    assert runner.accepted > 0
    assert wait_for(lambda: len(audit.query()) == 1)
    row = audit.query()[0]
    assert (row["completion_tokens"], row["prompt_tokens"]) == (r.usage.completion_tokens, r.usage.prompt_tokens)


def test_cancel_and_timeout_while_speculating(pool, runner, audit):
    from helpers import wait_for

    stream = pool.complete(PROMPTS[1], "tiny", temperature=0, max_tokens=400, stream=True, **LOOPING)
    for _ in stream:
        if runner.solo is not None:
            break
    stream.close()
    assert wait_for(lambda: len(audit.query()) == 1) and audit.query()[0]["status"] == "cancelled"
    r = pool.complete(PROMPTS[1], "tiny", temperature=0, max_tokens=400, timeout=0.2, **LOOPING)
    assert r.finish_reason == "timeout" and 0 < r.usage.completion_tokens < 400
    assert runner.accepted > 0 and runner.solo is None and not runner.active


def test_max_tokens_exact(pool, runner):
    for n in (1, 2, 3, 5, 8, 13, 21, 34):
        plain = pool.complete(PROMPTS[1], "tiny", temperature=0, max_tokens=n, speculative=False, **LOOPING)
        r = pool.complete(PROMPTS[1], "tiny", temperature=0, max_tokens=n, **LOOPING)
        same(r, plain)
        assert r.finish_reason == "stop" or r.usage.completion_tokens == n
    sampled = [pool.complete(PROMPTS[1], "tiny", temperature=0.7, max_tokens=25, **LOOPING) for _ in range(4)]
    assert all(r.finish_reason == "stop" or r.usage.completion_tokens == 25 for r in sampled)
    assert runner.accepted > 0


def test_logprobs_of_accepted_tokens(pool, runner):
    plain = pool.complete(PROMPTS[1], "tiny", temperature=0, max_tokens=60, logprobs=True, top_logprobs=3,
                          speculative=False, **LOOPING)
    before = runner.accepted
    r = pool.complete(PROMPTS[1], "tiny", temperature=0, max_tokens=60, logprobs=True, top_logprobs=3, **LOOPING)
    assert runner.accepted > before
    same(r, plain)
    assert len(r.logprobs) == r.usage.completion_tokens == len(plain.logprobs)
    for a, b in zip(r.logprobs, plain.logprobs, strict=True):
        assert (a.id, [t.id for t in a.top_logprobs]) == (b.id, [t.id for t in b.top_logprobs])
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_sampled_requests_run_speculatively(pool, runner):
    r = pool.complete(PROMPTS[1], "tiny", temperature=0.5, max_tokens=80, logprobs=True, **LOOPING)
    assert runner.drafted > 0
    assert len(r.logprobs) == r.usage.completion_tokens > 0


def test_a_seed_keeps_its_text(pool, runner):
    """A seeded sampled request decodes plainly: its text is the same alone or beside others."""
    a = pool.complete(PROMPTS[1], "tiny", temperature=0.7, seed=5, max_tokens=40, **LOOPING)
    b = pool.complete(PROMPTS[1], "tiny", temperature=0.7, seed=5, max_tokens=40, speculative=False, **LOOPING)
    same(a, b)
    assert runner.drafted == 0


def test_constrained_request_with_drafts_stays_valid(pool, runner):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "items": {"type": "array", "items": {
        "type": "string"}}}, "required": ["name", "items"]}
    ask = [{"role": "user", "content": 'Answer {"name": "ab", "items": ["ab", "ab", "ab", "ab", "ab"]}'}]
    for params in (dict(temperature=0), dict(temperature=0.8)):
        plain = pool.chat(ask, "tiny", schema=schema, max_tokens=120, speculative=False, **LOOPING, **params)
        r = pool.chat(ask, "tiny", schema=schema, max_tokens=120, **LOOPING, **params)
        if params["temperature"] == 0:
            same(r, plain)
        if r.finish_reason == "stop":
            assert set(json.loads(r.text)) == {"name", "items"}
        assert r.constrained
    assert runner.drafted > 0


def test_acceptance_draws_from_p():
    """Whatever the drafted token, the emitted one is distributed as p (speculative sampling)."""
    p = mx.array([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    n = 4000
    for drafted in (0, 1, 3):
        keys = mx.random.split(mx.random.key(drafted), n)
        counts = [0] * 4
        kept = 0
        for key in keys:
            out = speculative.accept_sampled(p, [drafted], key)
            counts[out[0]] += 1
            kept += len(out) == 2
        for token in range(4):
            assert counts[token] / n == pytest.approx(p[0, token].item(), abs=0.025), (drafted, counts)
        assert kept / n == pytest.approx(p[0, drafted].item(), abs=0.025)


def test_sampled_speculation_keeps_the_tokens_the_sampler_can_draw():
    """A row's top-p is the sampler's own (params.filtered, sorting only the tokens that can be kept), so
    speculative sampling draws from the request's distribution: mlx-lm's full sort rounds its running sum
    and keeps other boundary tokens over a real vocabulary."""
    logits = mx.random.normal((4, 49152), key=mx.random.key(0)) * 4.0
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    kept = mx.logical_not(mx.isinf(apply_top_p(lp, 0.99)))
    probs = speculative.distribution(lp, GenParams(temperature=1.0, top_p=0.99))
    assert mx.array_equal(probs > 0, kept).item()


def test_acceptance_of_several_drafts():
    """A refused draft's row is drawn without it; after all are kept, the last row gives one more."""
    p = mx.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert speculative.accept_sampled(p, [1, 2], mx.random.key(0)) == [1, 2, 0]
    assert speculative.accept_sampled(p, [1, 0], mx.random.key(0)) == [1, 2]
    assert speculative.accept_sampled(p, [0, 2], mx.random.key(0)) == [1]


def test_lookup_drafts_what_followed_the_last_ngram():
    lookup = speculative.Lookup()
    assert lookup.draft([1, 2, 3, 4, 5, 1, 2, 3], 3) == [4, 5, 1]
    assert lookup.draft([1, 2, 3, 4, 5, 1, 2, 3, 9], 3) == []
    assert lookup.draft([1, 2, 3, 4, 5, 1, 2, 3, 9, 7, 2, 3], 2) == [9, 7]  # the latest occurrence


def test_lookup_indexes_a_long_prompt_over_several_drafts():
    """A draft's work on the engine thread is bounded: a long prompt is indexed a piece per draft, its
    earlier occurrences first, the latest once the index has caught up."""
    filler = list(range(100, 100 + 3 * speculative.INDEX_STEP))
    tokens = [1, 2, 3, 9, *filler, 1, 2, 3, 8, *[t + 50_000 for t in filler], 1, 2, 3]
    lookup = speculative.Lookup()
    assert lookup.draft(tokens, 1) == [9]  # only the first piece is indexed
    drafts = [lookup.draft(tokens, 1) for _ in range(len(tokens) // speculative.INDEX_STEP)]
    assert drafts[-1] == [8]


def test_speculative_parameter():
    assert make_params(speculative=False).speculative is False
    with pytest.raises(InvalidParameterError, match="speculative"):
        make_params(speculative="no")


def test_http_opt_out(server, runner):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    body = dict(model="tiny", messages=[{"role": "user", "content": PROMPTS[1]}], temperature=0, max_tokens=40,
                extra_body={"repetition_penalty": 0.3, "speculative": False})
    client.chat.completions.create(**body)
    assert runner.drafted == 0
    with pytest.raises(openai.BadRequestError, match="speculative"):
        client.chat.completions.create(**{**body, "extra_body": {"speculative": "off"}})


def test_draft_model_gives_plain_text(make_pool, tiny_model_path, tmp_path):
    from tiny_model import build_tiny_model

    draft = build_tiny_model(tmp_path / "draft", seed=1)
    shutil.copy(tiny_model_path / "tokenizer.json", draft / "tokenizer.json")
    pool = make_pool(keep_alive=None)
    info = pool.load(tiny_model_path, alias="tiny", draft=draft)
    runner = pool.engine.runner(info.name)
    assert runner.draft is not None
    for prompt in PROMPTS:
        plain = pool.complete(prompt, "tiny", temperature=0, max_tokens=50, speculative=False, **LOOPING)
        same(pool.complete(prompt, "tiny", temperature=0, max_tokens=50, **LOOPING), plain)
    assert runner.drafted > 0
    pool.unload(info.name)
    assert pool.models() == []


def test_draft_model_of_another_vocabulary_is_refused(make_pool, tiny_model_path, tmp_path):
    from tiny_model import build_tiny_model, train_tokenizer

    draft = build_tiny_model(tmp_path / "draft", seed=1)
    train_tokenizer(vocab_size=300).save(str(draft / "tokenizer.json"))
    pool = make_pool(keep_alive=None)
    with pytest.raises(InvalidParameterError, match="vocabular"):
        pool.load(tiny_model_path, alias="tiny", draft=draft)
    assert pool.models() == []


def test_no_drafts_while_another_clients_background_work_waits(pool, runner):
    release = threading.Event()

    def other_clients_job():  # e.g. another client's long prompt being prefilled in slices
        yield
        while not release.is_set():
            yield

    pool.engine.run(pool.engine._slices.add, other_clients_job(), 0, "10.0.0.9").result()
    plain = pool.complete(PROMPTS[1], "tiny", temperature=0, max_tokens=60, speculative=False, **LOOPING)
    beside = pool.complete(PROMPTS[1], "tiny", temperature=0, max_tokens=60, **LOOPING)
    assert runner.drafted == 0  # a verifying step costs about two plain ones: beside that work steps stay even
    release.set()
    same(beside, plain)
    same(pool.complete(PROMPTS[1], "tiny", temperature=0, max_tokens=60, **LOOPING), plain)
    assert runner.drafted > 0  # once it is done, the stream drafts again
