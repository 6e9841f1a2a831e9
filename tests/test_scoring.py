"""Scoring given text on the tiny model: ``pool.score`` and OpenAI completions' ``echo``, checked against the
model's own distribution computed here from its logits, and against the chat's per-token log-probabilities."""

import asyncio
import threading
import time

import mlx.core as mx
import openai
import pytest

from mlx_manager_nb import Score, scoring
from mlx_manager_nb.errors import ContextLengthError, InvalidParameterError
from mlx_manager_nb.server import serve

HI = [{"role": "user", "content": "Hi"}]
TEXT = "The capital of France is Paris. The capital of Italy is Rome."


@pytest.fixture(scope="module")
def pool(tiny_module_pool):
    return tiny_module_pool


@pytest.fixture(scope="module")
def server(pool):
    s = serve(pool, port=0, mode="thread")
    yield s
    s.stop(drain=0)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def tokenizer(pool):
    return pool.engine.runner("tiny-llama").tokenizer


def rows_of(pool, tokens):
    """log_softmax of the model's logits over ``tokens`` in one forward pass: row ``j`` is the distribution of
    the token at ``j + 1``."""
    runner = pool.engine.runner("tiny-llama")

    def forward():
        logits = runner.model(mx.array([tokens]))[0].astype(mx.float32)
        return (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).tolist()

    return pool.engine.run(forward).result()


def top_ids(row, k):
    return sorted(range(len(row)), key=lambda i: -row[i])[:k]


def test_a_text_alone_is_scored_from_its_second_token_as_the_model_gives_it(pool):
    s = pool.score(TEXT, top_logprobs=3)
    tokens = list(tokenizer(pool).encode(TEXT))
    rows = rows_of(pool, tokens)
    assert isinstance(s, Score) and [e.id for e in s.tokens] == tokens[1:]
    expected = [rows[j][tokens[j + 1]] for j in range(len(tokens) - 1)]
    assert [e.logprob for e in s.tokens] == pytest.approx(expected, abs=1e-4)
    assert s.logprob == pytest.approx(sum(expected), abs=1e-3)
    assert s.perplexity == pytest.approx(2.718281828 ** (-sum(expected) / len(expected)), rel=1e-4)
    for j, e in enumerate(s.tokens):
        assert [t.id for t in e.top_logprobs] == top_ids(rows[j], 3)
        assert [t.logprob for t in e.top_logprobs] == pytest.approx([rows[j][i] for i in top_ids(rows[j], 3)],
                                                                      abs=1e-4)
    assert s.greedy == all(e.top_logprobs[0].id == e.id for e in s.tokens)


def test_a_continuation_scores_as_the_sum_of_the_chats_own_logprobs(pool):
    tok = tokenizer(pool)

    def answer(question):
        """A greedy answer's longest start whose text gives back its tokens (the random model's answers are
        mostly stray bytes, which do not), with the chat's per-token log-probabilities."""
        messages = [{"role": "user", "content": question}]
        r = pool.chat(messages, temperature=0, max_tokens=16, logprobs=True)
        ids = [e.id for e in r.logprobs]
        k = max(k for k in range(len(ids) + 1) if list(tok.encode(tok.decode(ids[:k]), add_special_tokens=False))
                == ids[:k])
        return messages, tok.decode(ids[:k]), r.logprobs[:k]

    messages, text, entries = max(map(answer, ["Hi", "Once upon a time", "def add"]), key=lambda a: len(a[2]))
    assert len(entries) >= 4
    s = pool.score(messages, continuation=text)
    assert [e.id for e in s.tokens] == [e.id for e in entries]
    assert s.logprob == pytest.approx(sum(e.logprob for e in entries), abs=1e-4)
    assert [e.logprob for e in s.tokens] == pytest.approx([e.logprob for e in entries], abs=1e-4)
    assert s.greedy  # the chat's greedy tokens were the most likely ones
    assert s.tokens[0].top_logprobs == []  # none asked


def test_a_batch_equals_the_singles_and_pairs_as_documented(pool):
    contexts = ["The capital of France is", "Hello world! How are", "def add(a, b):\n   "]
    choices = [" Paris", " Rome", " you today", " return a + b"]
    singles = [[pool.score(c, continuation=x, top_logprobs=2) for x in choices] for c in contexts]
    grid = [pool.score(c, continuation=choices, top_logprobs=2) for c in contexts]  # a context's choices
    paired = pool.score(contexts, continuation=choices[:3], top_logprobs=2)  # item by item
    for row, one in zip(grid, singles, strict=True):
        assert [s.logprob for s in row] == pytest.approx([s.logprob for s in one], abs=1e-4)
        assert [[e.id for e in s.tokens] for s in row] == [[e.id for e in s.tokens] for s in one]
    assert [s.logprob for s in paired] == pytest.approx([singles[i][i].logprob for i in range(3)], abs=1e-4)
    each = pool.score(contexts, continuation=" Paris")
    assert [s.logprob for s in each] == pytest.approx([singles[i][0].logprob for i in range(3)], abs=1e-4)


@pytest.mark.parametrize("logits", [scoring.MAX_PASS_LOGITS, 320 * 16], ids=["default", "16-token passes"])
def test_a_long_text_is_scored_in_slices_as_in_one_pass_and_the_prompt_cache_is_untouched(pool, monkeypatch,
                                                                                          logits):
    monkeypatch.setattr(scoring, "MAX_PASS_LOGITS", logits)  # the tiny model's vocabulary is 320 tokens
    text = " ".join([TEXT] * 12)
    tokens = list(tokenizer(pool).encode(text))
    assert len(tokens) > 300  # longer than a pass: chunks with a KV cache
    rows = rows_of(pool, tokens)
    cache = pool.engine.runner("tiny-llama").prompt_cache
    held = len(cache), cache.nbytes
    s = pool.score(text)
    assert [e.logprob for e in s.tokens] == pytest.approx([rows[j][tokens[j + 1]] for j in range(len(tokens) - 1)],
                                                          abs=1e-4)
    assert (len(cache), cache.nbytes) == held  # scoring neither reads nor fills it


def test_a_running_stream_keeps_its_pace_while_a_long_score_runs(pool):
    text = " ".join([TEXT] * 12)
    stream = pool.chat(HI, temperature=0, max_tokens=200, stream=True)
    alone = pool.chat(HI, temperature=0, max_tokens=200).text
    gaps, last, done = [], [time.perf_counter()], threading.Event()

    def read():
        for _ in stream:
            now = time.perf_counter()
            gaps.append(now - last[0])
            last[0] = now
        done.set()

    reader = threading.Thread(target=read)
    reader.start()
    scores = pool.score([text] * 8)
    reader.join()
    assert "".join(stream.result.text) == alone and len(scores) == 8  # unharmed
    assert max(gaps[1:]) < 1.0  # never held up for a whole score


def test_ascore_equals_score(pool):
    async def both():
        return await pool.ascore(TEXT, continuation=" Rome"), await pool.ascore([TEXT, "Hello world"])

    one, many = asyncio.run(both())
    assert one.logprob == pytest.approx(pool.score(TEXT, continuation=" Rome").logprob, abs=1e-5)
    assert [s.logprob for s in many] == pytest.approx([s.logprob for s in pool.score([TEXT, "Hello world"])],
                                                      abs=1e-5)


@pytest.mark.parametrize("text, continuation, field", [
    ("", " x", "text"),
    ("H", None, "text"),
    ("Hi", "", "continuation"),
    (["a b", "c d"], [" x"] * 3, "continuation"),
    ([{"role": "wizard", "content": "x"}], " x", "messages[0].role"),
])
def test_bad_input_names_the_field(pool, text, continuation, field):
    with pytest.raises(InvalidParameterError) as caught:
        pool.score(text, continuation=continuation)
    assert caught.value.param == field


def test_a_text_over_the_context_is_refused_naming_it(pool, client):
    long = "Hello world " * 400  # over the tiny model's 512 tokens
    with pytest.raises(ContextLengthError) as caught:
        pool.score(["Hi there", long])
    assert caught.value.param == "text[1]"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=long, echo=True, max_tokens=0, logprobs=0)
    assert caught.value.body["code"] == "context_length_exceeded" and caught.value.body["param"] == "prompt"


def test_a_one_token_prompt_echoes_with_nothing_scored(pool, client):
    token = tokenizer(pool).encode("Hello")[0]
    r = client.completions.create(model="tiny", prompt=[token], echo=True, max_tokens=0, logprobs=0)
    lp = r.choices[0].logprobs
    assert (lp.token_logprobs, lp.top_logprobs, lp.text_offset) == ([None], [None], [0])
    assert r.choices[0].text == tokenizer(pool).decode([token]) == lp.tokens[0]


def test_score_is_audited(pool, audit):
    pool.score(TEXT, meta={"audit": audit})
    (row,) = audit.query()
    assert (row["endpoint"], row["status"], row["prompt_tokens"]) == ("pool.score", "ok",
                                                                      len(tokenizer(pool).encode(TEXT)))


# -- OpenAI completions: echo, token-id prompts, batches ----------------------------------------------------


def lm_eval_parse(choice, ctxlen):
    """What lm-eval 0.4.13's local-completions model reads of a loglikelihood answer (parse_logprobs)."""
    token_logprobs = choice.logprobs.token_logprobs[ctxlen:-1]
    tops = choice.logprobs.top_logprobs[ctxlen:-1]
    return sum(token_logprobs), all(t == max(top.values()) for t, top in zip(token_logprobs, tops, strict=True))


def test_echo_of_token_id_prompts_is_what_lm_eval_reads(pool, client):
    tok = tokenizer(pool)
    pairs = [("The capital of France is", " Paris"), ("Hello world! How are", " you today"),
             ("The capital of France is", " Rome")]
    contexts = [list(tok.encode(c)) for c, _ in pairs]
    prompts = [list(tok.encode(c + x)) for c, x in pairs]
    r = client.completions.create(model="tiny", prompt=prompts, echo=True, max_tokens=1, logprobs=1, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for choice, prompt, context, (c, x) in zip(r.choices, prompts, contexts, pairs, strict=True):
        lp = choice.logprobs
        assert len(lp.tokens) == len(prompt) + 1  # the prompt's tokens, then the one generated
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing comes before the first
        rows = rows_of(pool, prompt)
        assert lp.token_logprobs[1:-1] == pytest.approx([rows[j][prompt[j + 1]] for j in range(len(prompt) - 1)],
                                                        abs=1e-4)
        assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])  # the best alternative, and the token
        assert choice.text.startswith(c + x)
        total, greedy = lm_eval_parse(choice, len(context))
        score = pool.score(c, continuation=x)
        assert total == pytest.approx(score.logprob, abs=1e-4) and greedy == score.greedy
    assert r.usage.prompt_tokens == sum(map(len, prompts)) and r.usage.completion_tokens == 3


def test_echo_with_max_tokens_0_scores_the_text_alone(pool, client):
    r = client.completions.create(model="tiny", prompt=TEXT, echo=True, max_tokens=0, logprobs=3)
    (choice,) = r.choices
    assert choice.text == TEXT and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = choice.logprobs
    score = pool.score(TEXT, top_logprobs=3)
    assert lp.token_logprobs[1:] == pytest.approx([e.logprob for e in score.tokens], abs=1e-5)
    assert lp.tokens == [tokenizer(pool).decode([t]) for t in tokenizer(pool).encode(TEXT)]
    assert [TEXT[o:o + len(t)] for t, o in zip(lp.tokens, lp.text_offset, strict=True)] == lp.tokens
    assert [max(top, key=top.get) for top in lp.top_logprobs[1:]] == [e.top_logprobs[0].token for e in score.tokens]
    assert r.usage.prompt_tokens == len(lp.tokens)


def test_echo_streamed_equals_not_streamed(client):
    ask = dict(model="tiny", prompt=TEXT, echo=True, max_tokens=8, logprobs=2, temperature=0)
    r = client.completions.create(**ask)
    text, merged = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(**ask, stream=True):
        if chunk.choices:
            text += chunk.choices[0].text
            if chunk.choices[0].logprobs is not None:
                for key in merged:
                    merged[key] += getattr(chunk.choices[0].logprobs, key)
    assert text == r.choices[0].text and text.startswith(TEXT)
    assert merged == r.choices[0].logprobs.model_dump()
    plain = client.completions.create(model="tiny", prompt=TEXT, echo=True, max_tokens=8, temperature=0)
    assert plain.choices[0].text == text and plain.choices[0].logprobs is None


def test_a_batch_of_prompts_answers_as_each_alone(client):
    prompts = ["The capital of France", "Hello world", "def add"]
    batch = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts]
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == alone
    ids = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_each_part_of_an_echoed_batch_has_an_audit_row_of_its_own(pool, audit, caplog):
    s = serve(pool, audit=audit, port=0, mode="thread")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        c.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=2, echo=True, logprobs=1,
                             extra_headers={"x-request-id": "batch-1"})
    finally:
        s.stop(drain=1)  # stopping flushes the audit log
    rows = audit.query(client_request_id="batch-1")
    assert sorted(r["endpoint"] for r in rows) == ["/v1/completions"] * 3  # the scoring and two generations
    assert len({r["id"] for r in rows}) == 3 and "already stored" not in caplog.text


def test_an_echo_without_logprobs_or_generation_has_its_audit_row(pool, audit):
    s = serve(pool, audit=audit, port=0, mode="thread")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        r = c.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=0, echo=True,
                                 extra_headers={"x-request-id": "echo-1"})
    finally:
        s.stop(drain=1)  # stopping flushes the audit log
    (row,) = audit.query(client_request_id="echo-1")
    assert (row["status"], row["prompt_tokens"], r.usage.prompt_tokens) == ("ok", 5, 5)


def test_a_batch_runs_a_few_prompts_at_a_time(pool, client, monkeypatch):
    from mlx_manager_nb.server import openai_api

    monkeypatch.setattr(openai_api, "BATCH_AT_ONCE", 2)
    runner = pool.engine.runner("tiny-llama")
    seen, done = [], threading.Event()

    def watch():
        while not done.is_set():
            seen.append(len(runner.active) + len(runner.waiting) + len(runner.prefilling))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        r = client.completions.create(model="tiny", prompt=[f"Hello world {i}" for i in range(6)], max_tokens=40,
                                      temperature=0)
    finally:
        done.set()
        watcher.join()
    assert len(r.choices) == 6 and r.usage.completion_tokens > 6
    assert max(seen) == 2  # two at once, never more


@pytest.mark.parametrize("ask, field", [
    (dict(prompt=[1, 100000]), "prompt"),
    (dict(prompt=["ok", 3]), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=[[1, 2], []]), "prompt"),
    (dict(prompt=["a", ""]), "prompt[1]"),
    (dict(prompt="Hi", max_tokens=0), "max_tokens"),
    (dict(prompt=["a", "b"], stream=True), "stream"),
    (dict(prompt="Hi", echo=True, max_tokens=0, stream=True), "stream"),
    (dict(prompt="Hi", echo="yes"), "echo"),
])
def test_bad_completions_prompts_are_400s_naming_the_field(client, ask, field):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", **{"max_tokens": 2, **ask})
    assert caught.value.body["param"] == field
