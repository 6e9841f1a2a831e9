"""The time-sliced engine: long prefills, embedding batches and loads run in slices between decode
steps, so a running stream keeps its pace; notebook requests go ahead of queued HTTP ones."""

import json
import threading
import time

import pytest
from helpers import call, wait_for
from tiny_model import build_tiny_model

from mlx_manager_nb import engine
from mlx_manager_nb.server import serve
from mlx_manager_nb.shared_prefix import shared_length
from mlx_manager_nb.slices import Slices, pause

STORY = "Once upon a time there was a tiny model that could talk. "


@pytest.fixture(scope="module")
def slow_model_path(tmp_path_factory):
    """A tiny model wide and deep enough that a few thousand prompt tokens take many slices to prefill."""
    path = build_tiny_model(tmp_path_factory.mktemp("slow") / "slow-llama", hidden_size=256, num_hidden_layers=4,
                            intermediate_size=512, max_position_embeddings=8192)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 8192}))
    return path


@pytest.fixture
def slow(make_pool, slow_model_path, audit):
    pool = make_pool(keep_alive=None, audit=audit)
    pool.load(slow_model_path, alias="slow")
    return pool


def read_in_thread(stream) -> tuple[list[float], threading.Thread]:
    """Read ``stream`` on a thread; the list gets each delta's arrival time."""
    stamps: list[float] = []

    def read():
        for _ in stream:
            stamps.append(time.perf_counter())

    reader = threading.Thread(target=read)
    reader.start()
    return stamps, reader


def busy_job(pieces: list[float]):
    """A background job that uses each slice whole; ``pieces`` gets each slice's budget."""
    budget = yield
    while True:
        pieces.append(budget)
        time.sleep(budget)
        budget = yield


def test_background_work_gets_a_slice_after_every_second_decode_step():
    slices, pieces = Slices(), []
    slices.add(busy_job(pieces))
    for _ in range(20):
        time.sleep(0.03)  # a decode step
        slices.step_took(0.03)
        slices.run(decoding=True)
    assert 4 <= len(pieces) <= 10, len(pieces)  # half the steps' time, slices of one step: ~every second step
    assert all(p == pytest.approx(0.03) for p in pieces)
    slices.run(decoding=False)
    assert pieces[-1] == 1.0  # nothing decodes: a long slice at once


def test_no_slice_follows_a_decode_step_that_ran_long():
    slices, pieces = Slices(), []
    slices.add(busy_job(pieces))
    after_long = 0
    for i in range(40):
        step = 0.09 if i % 4 == 3 else 0.03  # every fourth step three times as long: a busy CPU
        slices.step_took(step)
        before = len(pieces)
        slices.run(decoding=True)
        after_long += step == 0.09 and len(pieces) > before
    assert after_long == 0 and len(pieces) >= 8, len(pieces)  # put off to the next rounds, not dropped


def test_a_clients_background_work_gets_less_beside_another_clients_stream_than_beside_its_own():
    def slices_run(decoding: set) -> int:
        slices, pieces = Slices(), []
        slices.add(busy_job(pieces), client="10.0.0.1")
        for _ in range(30):
            time.sleep(0.02)  # a decode step of the clients ``decoding``
            slices.step_took(0.02, decoding)
            slices.run(decoding=True)
        return len(pieces)

    own = slices_run({"10.0.0.1"})  # a client's prefill beside its own streams: half the steps' time
    beside = slices_run({"10.0.0.1", "10.0.0.2"})  # ... beside another client's stream: a third
    assert 9 <= own <= 16, own
    assert beside <= 0.8 * own, (beside, own)


def test_pause_ends_a_slice_once_its_budget_is_spent_and_not_before():
    def job(done):
        budget = yield
        start = time.perf_counter()
        for i in range(6):
            done.append(i)  # a piece of work
            start, budget = yield from pause(start, budget)

    spent, roomy = [], []
    j = job(spent)
    next(j)
    j.send(0.0)  # no time left after the first piece: the slice ends there
    assert spent == [0]
    j.send(0.0)
    assert spent == [0, 1]
    j = job(roomy)
    next(j)
    with pytest.raises(StopIteration):
        j.send(3600.0)  # time for every piece in one slice
    assert roomy == list(range(6))


def test_a_stream_keeps_decoding_while_a_long_prompt_prefills(slow):
    bystander = slow.complete("Hello", temperature=0, max_tokens=4000, stream=True)
    stamps, reader = read_in_thread(bystander)
    assert wait_for(lambda: len(stamps) > 5)
    start = time.perf_counter()
    long = slow.complete(STORY * 60, temperature=0, max_tokens=1)  # about 2,100 tokens
    end = time.perf_counter()
    during = sum(start <= t <= end for t in stamps)
    bystander.close()
    reader.join()
    assert long.usage.prompt_tokens > 2000 and long.usage.completion_tokens == 1
    # In one batch step, the prompt took two steps (2,048-token chunks); in slices the bystander
    # gets a token between each slice.
    assert during >= 20, during


def test_short_prompts_arriving_together_beside_a_stream_prefill_in_slices(slow):
    bystander = slow.complete("Hello", temperature=0, max_tokens=4000, stream=True)
    stamps, reader = read_in_thread(bystander)
    assert wait_for(lambda: len(stamps) > 5)
    results = []
    burst = [threading.Thread(target=lambda i=i: results.append(
        slow.complete(f"{i} " + STORY, temperature=0, max_tokens=1))) for i in range(8)]
    start = time.perf_counter()
    for t in burst:
        t.start()
    for t in burst:
        t.join()
    end = time.perf_counter()
    during = sum(start <= t <= end for t in stamps)
    bystander.close()
    reader.join()
    assert len(results) == 8 and all(30 < r.usage.prompt_tokens <= engine.PREFILL_THRESHOLD for r in results)
    # Admitted straight into the batch, the eight prompts were prefilled in one step, with the
    # bystander waiting for all of them; in slices it gets tokens between their pieces.
    assert during >= 16, during


def test_a_sliced_prefill_gives_the_tokens_the_batch_gives(slow, monkeypatch):
    prompt = STORY * 20
    sliced = slow.complete(prompt, temperature=0, max_tokens=24)
    follow = slow.complete(prompt + "And then", temperature=0, max_tokens=24)  # its prefix from the prompt cache
    monkeypatch.setattr(engine, "PREFILL_THRESHOLD", 10**9)
    slow.engine.runner("slow-llama").prompt_cache.trim_to(n_sequences=0)
    whole = slow.complete(prompt, temperature=0, max_tokens=24)
    assert sliced.text == whole.text and len(set(whole.text)) > 3
    assert sliced.usage == whole.usage and sliced.usage.cached_tokens == 0 and sliced.ttft > 0
    assert follow.usage.cached_tokens >= sliced.usage.prompt_tokens - 1
    longer = slow.complete(prompt + STORY * 4, temperature=0, max_tokens=24)  # in one piece, after the cached part
    monkeypatch.setattr(engine, "PREFILL_THRESHOLD", 0)
    assert slow.complete(prompt + STORY * 4, temperature=0, max_tokens=24).text == longer.text  # sliced, cached
    slow.engine.runner("slow-llama").prompt_cache.trim_to(n_sequences=0)
    assert slow.complete(prompt + "And then", temperature=0, max_tokens=24).text == follow.text
    slow.engine.runner("slow-llama").prompt_cache.trim_to(n_sequences=0)
    assert slow.complete(prompt + STORY * 4, temperature=0, max_tokens=24).text == longer.text


def test_cancelling_during_prefill_ends_the_request_and_frees_its_kv(slow, audit):
    runner = slow.engine.runner("slow-llama")
    s = slow.complete(STORY * 100, temperature=0, max_tokens=8, stream=True)
    assert wait_for(lambda: runner.prefilling and runner.kv_bytes > 0)
    s.close()
    assert wait_for(lambda: not runner.prefilling and runner.kv_bytes == 0)
    assert wait_for(lambda: slow.models()[0].in_flight == 0)
    assert wait_for(lambda: len(audit.query()) == 1)
    assert audit.query()[0]["status"] == "cancelled" and audit.query()[0]["completion_tokens"] == 0
    late = slow.complete(STORY * 100, temperature=0, max_tokens=8, timeout=0.3)
    assert late.finish_reason == "timeout"
    assert slow.complete("Hello", temperature=0, max_tokens=3).usage.completion_tokens == 3


def test_prefilling_requests_count_in_the_kv_budget(slow):
    runner = slow.engine.runner("slow-llama")
    runner.kv_budget = 1  # one sequence at a time
    first = slow.complete(STORY * 100, temperature=0, max_tokens=2, stream=True)
    assert wait_for(lambda: runner.prefilling)
    second = slow.complete("Hello", temperature=0, max_tokens=2, stream=True)
    assert wait_for(lambda: len(runner.waiting) == 1)
    assert runner.prefilling  # the short one waits for the prefilling one
    assert "".join(first) is not None and first.result.finish_reason == "length"
    assert "".join(second) is not None and second.result.usage.completion_tokens == 2


def test_notebook_requests_go_ahead_of_queued_http_ones(pool):
    runner = pool.engine.runner("tiny-llama")
    runner.kv_budget = 1  # one sequence at a time: the others queue
    server = serve(pool, port=0, mode="thread")
    finished: list[str] = []
    release = threading.Event()
    try:
        pool.engine.run(release.wait)  # the engine is busy: the requests below arrive together, HTTP first

        def http(tag):
            status, _, _ = call(f"{server.url}/v1/chat/completions", {
                "model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": tag}]})
            assert status == 200
            finished.append(tag)

        def notebook():
            pool.chat([{"role": "user", "content": "me"}], temperature=0, max_tokens=4)
            finished.append("notebook")

        clients = [threading.Thread(target=http, args=(f"http {i}",)) for i in range(2)]
        for c in clients:
            c.start()
        assert wait_for(lambda: pool.models()[0].in_flight == 2)
        mine = threading.Thread(target=notebook)
        mine.start()
        assert wait_for(lambda: pool.models()[0].in_flight == 3)
        time.sleep(0.2)  # from the request's start to the engine's queue
        release.set()
        for t in [*clients, mine]:
            t.join(30)
        assert finished[0] == "notebook" and sorted(finished[1:]) == ["http 0", "http 1"]
    finally:
        release.set()
        server.stop(drain=0)


def test_an_embedding_batch_runs_in_passes_between_decode_steps(pool, tmp_path, monkeypatch):
    from tiny_bert import build_tiny_bert

    from mlx_manager_nb import embeddings

    pool.load(build_tiny_bert(tmp_path / "tiny-bert"), alias="bert")
    passes: list[tuple[float, float]] = []
    forward = embeddings._forward

    def timed(model, seqs):
        start = time.perf_counter()
        out = forward(model, seqs)
        passes.append((start, time.perf_counter()))
        return out

    monkeypatch.setattr(embeddings, "_forward", timed)
    bystander = pool.chat([{"role": "user", "content": "hi"}], temperature=0, max_tokens=480, stream=True)
    stamps, reader = read_in_thread(bystander)
    assert wait_for(lambda: len(stamps) > 5)
    start = time.perf_counter()
    vectors = pool.embed([[5] * 30] * 2048, model="bert")
    end = time.perf_counter()
    bystander.close()
    reader.join()
    assert vectors.shape[0] == 2048 and len(passes) >= 4, len(passes)
    during = sum(start <= t <= end for t in stamps)
    assert during >= 10, during  # in one piece, the whole batch ran between two decode steps


def test_a_load_runs_in_slices_beside_a_stream(slow, tmp_path, monkeypatch):
    from mlx_manager_nb import slices

    pool = slow
    monkeypatch.setattr(slices, "SLICE_FLOOR", 0.0)  # slices of one decode step of the tiny model: many of them
    bigger = build_tiny_model(tmp_path / "bigger", hidden_size=512, num_hidden_layers=8, intermediate_size=1024)
    eos = pool.engine.runner(pool.models()[0].name).tokenizer.eos_token_id
    # a stream that outlasts the load (the tiny model's 480 tokens could end before it on a busy CPU)
    bystander = pool.chat([{"role": "user", "content": "hi"}], temperature=0, max_tokens=6000, stream=True,
                          logit_bias={eos: -100})
    stamps, reader = read_in_thread(bystander)
    assert wait_for(lambda: len(stamps) > 5)
    progress: list[float] = []
    start = time.perf_counter()
    pool.load(bigger, progress=lambda stage, fraction: progress.append(fraction))
    end = time.perf_counter()
    bystander.close()
    reader.join()
    assert len([f for f in progress if 0 < f < 1]) >= 2, progress  # its weights took several slices
    assert progress == sorted(progress) and progress[-1] == 1.0
    during = sum(start <= t <= end for t in stamps)
    assert during >= 5, during  # in one piece, the load ran between two decode steps
    assert pool.chat([{"role": "user", "content": "hi"}], model="bigger", max_tokens=2).usage.completion_tokens == 2


def shared_prompts(n: int) -> list[str]:
    return [STORY * 20 + f"Question {i}: what did the model say first?" for i in range(n)]


def one_at_a_time(pool, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy answers of ``prompts`` run alone, each from an empty prompt cache."""
    texts = []
    for prompt in prompts:
        pool.engine.runner("slow-llama").prompt_cache.trim_to(n_sequences=0)
        texts.append(pool.complete(prompt, temperature=0, max_tokens=max_tokens).text)
    pool.engine.runner("slow-llama").prompt_cache.trim_to(n_sequences=0)
    return texts


def arriving_together(pool, prompts: list[str], max_tokens: int) -> list:
    """Streams of ``prompts`` that reach the engine in one batch of its inbox, in this order."""
    release = threading.Event()
    pool.engine.run(release.wait)
    try:
        return [pool.complete(p, temperature=0, max_tokens=max_tokens, stream=True) for p in prompts]
    finally:
        release.set()


def test_concurrent_prompts_sharing_a_start_prefill_it_once(slow):
    prompts = shared_prompts(4)
    alone = one_at_a_time(slow, [*prompts, "Hello"], 12)
    bystander = slow.complete("Hello", temperature=0, max_tokens=12, stream=True)
    streams = arriving_together(slow, prompts, 12)
    assert ["".join(s) for s in streams] == alone[:4]
    assert "".join(bystander) == alone[4]
    usage = [s.result.usage for s in streams]
    computed = [u.prompt_tokens - u.cached_tokens for u in usage]
    assert usage[0].cached_tokens == 0 and usage[0].prompt_tokens > 600
    # the others took the first one's KV for all they share, and computed only their own question
    shared = shared_length(*(slow.engine.runner("slow-llama").tokenizer.encode(p) for p in prompts[:2]))
    assert all(u.cached_tokens == shared for u in usage[1:]), (shared, usage)
    assert sum(computed) < 1.2 * usage[0].prompt_tokens, computed


def test_cancelling_the_request_others_share_a_prefill_with_leaves_them_correct(slow, monkeypatch):
    from mlx_manager_nb import slices

    monkeypatch.setattr(slices, "IDLE_SLICE", 0.005)  # many slices: the first is cut halfway through
    runner = slow.engine.runner("slow-llama")
    prompts = shared_prompts(4)
    alone = one_at_a_time(slow, prompts[1:], 8)
    first, *others = arriving_together(slow, prompts, 8)
    assert wait_for(lambda: runner.prefilling and 100 < runner.prefilling[0].done < 500, timeout=30)
    first.close()
    assert ["".join(s) for s in others] == alone
    usage = [s.result.usage for s in others]
    assert min(u.cached_tokens for u in usage) > 100  # one went on from the KV the first had computed
    assert sum(u.prompt_tokens - u.cached_tokens for u in usage) < 1.2 * usage[0].prompt_tokens, usage
    assert not runner.prefilling and slow.complete("Hello", max_tokens=2).usage.completion_tokens == 2


def test_a_prompt_arriving_later_shares_the_start_being_prefilled_or_decoded(slow, monkeypatch):
    from mlx_manager_nb import slices

    monkeypatch.setattr(slices, "IDLE_SLICE", 0.005)
    runner = slow.engine.runner("slow-llama")
    first, second, third = shared_prompts(3)
    alone = [*one_at_a_time(slow, [second], 300), *one_at_a_time(slow, [third], 8)]
    leading = slow.complete(first, temperature=0, max_tokens=300, stream=True)
    stamps, reader = read_in_thread(leading)
    assert wait_for(lambda: runner.prefilling and 100 < runner.prefilling[0].done < 500, timeout=30)
    during_prefill = slow.complete(second, temperature=0, max_tokens=300, stream=True)  # waits for the first
    texts, reader_2 = [], threading.Thread(target=lambda: texts.append("".join(during_prefill)))
    reader_2.start()
    assert wait_for(lambda: len(stamps) > 5) and not runner.prefilling
    while_decoding = slow.complete(third, temperature=0, max_tokens=8)  # the prefix went to the prompt cache
    still_decoding = during_prefill.result is None
    reader.join()
    reader_2.join()
    assert still_decoding and [*texts, while_decoding.text] == alone
    shared = shared_length(*(runner.tokenizer.encode(p) for p in (first, second)))
    assert during_prefill.result.usage.cached_tokens == while_decoding.usage.cached_tokens == shared


@pytest.mark.parametrize("cut", [(), (1,), (0, 1)])
def test_prompts_sharing_starts_of_different_lengths_wait_in_a_chain(slow, monkeypatch, cut):
    from mlx_manager_nb import slices

    monkeypatch.setattr(slices, "IDLE_SLICE", 0.005)
    runner = slow.engine.runner("slow-llama")
    base, more = STORY * 20, "But" + STORY * 6
    prompts = [base + "The end.", base + more + "Yes.", base + more + "No.", base + more[:90] + "Maybe.", "Hi" + STORY]
    keep = [i for i in range(len(prompts)) if i not in cut]
    alone = one_at_a_time(slow, [prompts[i] for i in keep], 6)
    streams = arriving_together(slow, prompts, 6)
    assert wait_for(lambda: runner.prefilling and 100 < runner.prefilling[0].done < 500, timeout=30)
    for i in cut:  # the first, and the second, that the third waits for
        streams[i].close()
    assert ["".join(streams[i]) for i in keep] == alone
    assert wait_for(lambda: not runner.prefilling)
    if not cut:  # each took what it shares with the one that shares the most with it
        ids = [runner.tokenizer.encode(p) for p in prompts]
        assert [s.result.usage.cached_tokens for s in streams] == [
            0, shared_length(ids[0], ids[1]), shared_length(ids[1], ids[2]), shared_length(ids[1], ids[3]), 0]


def test_a_new_models_one_time_measurements_wait_until_the_engine_is_idle(slow, tiny_model_path):
    from mlx_manager_nb import constraints

    pool = slow
    eos = pool.engine.runner("slow-llama").tokenizer.eos_token_id
    bystander = pool.chat([{"role": "user", "content": "hi"}], temperature=0, max_tokens=6000, stream=True,
                          logit_bias={eos: -100})
    stamps, reader = read_in_thread(bystander)
    assert wait_for(lambda: len(stamps) > 5)
    pool.load(tiny_model_path, alias="tiny")
    runner = pool.engine.runner(pool.find("tiny").name)
    time.sleep(0.3)
    # llguidance's view of its tokenizer (a conversion holding the GIL a while) and its KV bytes a token
    # (a forward pass) are not made beside a running stream...
    prepared = lambda: runner.tokenizer in constraints._models and runner.token_bytes is not None  # noqa: E731
    assert runner.tokenizer not in constraints._models and runner.token_bytes is None
    bystander.close()
    reader.join()
    assert wait_for(prepared)  # ... but once the engine is idle
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    answer = pool.chat([{"role": "user", "content": "hi"}], model="tiny", max_tokens=20, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert json.loads(answer.text).keys() == {"a"}
