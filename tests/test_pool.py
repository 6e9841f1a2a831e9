"""The pool and engine on the tiny model: batching, cancellation, stops, seeds, eviction, failures."""

import asyncio
import shutil
import threading

import pytest
from helpers import wait_for

from mlx_manager_nb.errors import EngineError, ModelNotFoundError, PoolFullError
from mlx_manager_nb.model_pool import ModelEvent, RequestEvent

HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture
def pool(make_pool, tiny_model_path):
    p = make_pool(keep_alive=None)
    p.load(tiny_model_path, alias="tiny")
    return p


@pytest.fixture
def copies(tiny_model_path, tmp_path):
    """Three differently named copies of the tiny model."""
    out = []
    for name in "abc":
        shutil.copytree(tiny_model_path, tmp_path / name)
        out.append(tmp_path / name)
    return out


def prompts(n):
    return [[{"role": "user", "content": f"Question number {i}: {'why ' * i}?"}] for i in range(n)]


def test_greedy_output_is_the_same_alone_and_inside_a_batch_of_8(pool):
    alone = [pool.chat(m, temperature=0, max_tokens=24).text for m in prompts(8)]
    results = [None] * 8

    def run(i, m):
        results[i] = pool.chat(m, temperature=0, max_tokens=24).text

    threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate(prompts(8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone
    assert len(set(alone)) > 1  # the prompts really differ


def test_a_request_joins_a_running_batch(pool):
    long = pool.chat(HELLO, temperature=0, max_tokens=300, stream=True)
    next(long)
    short = pool.chat(prompts(3)[2], temperature=0, max_tokens=5)
    assert short.usage.completion_tokens == 5
    assert long.result is None  # the long one was still decoding when the short one finished
    rest = "".join(long)
    assert long.result.usage.completion_tokens == 300 and rest


def test_stream_deltas_add_up_to_the_result(pool):
    s = pool.chat(HELLO, temperature=0, max_tokens=20, stream=True)
    deltas = list(s)
    assert len(deltas) > 1
    assert "".join(deltas) == s.result.text == pool.chat(HELLO, temperature=0, max_tokens=20).text
    assert s.result.finish_reason == "length"
    assert s.result.usage.prompt_tokens > 0 and s.result.ttft > 0


def test_cancelling_a_stream_frees_its_slot_and_memory(pool):
    runner = pool.engine.runner("tiny-llama")
    s = pool.chat(HELLO, temperature=0, max_tokens=400, stream=True)
    next(s)
    next(s)
    assert pool.models()[0].in_flight == 1
    s.close()
    assert wait_for(lambda: not runner.active)
    assert runner.gen.prompt_cache_nbytes == 0  # the batch holds no KV cache for it any more
    assert wait_for(lambda: pool.models()[0].in_flight == 0)
    assert pool.chat(HELLO, temperature=0, max_tokens=3).usage.completion_tokens == 3


def test_stop_strings_split_across_tokens_never_leak(pool):
    s = pool.chat(HELLO, temperature=0, max_tokens=20, stream=True)
    deltas = list(s)
    full = "".join(deltas)
    # a stop string that starts inside one delta and ends inside a later one
    i = len(deltas[0]) + len(deltas[1]) - 1
    stop = full[i:i + 3]
    assert len(stop) == 3 and full.find(stop) == i
    s = pool.chat(HELLO, temperature=0, max_tokens=20, stop=["never-there", stop], stream=True)
    seen = list(s)
    assert "".join(seen) == full[:i]
    assert s.result.finish_reason == "stop" and s.result.stop == stop
    assert all(stop[0] not in d or full[:i].count(stop[0]) for d in seen)


def test_same_seed_same_text_alone_and_in_a_batch(pool):
    a = pool.chat(HELLO, temperature=1.0, seed=42, max_tokens=16).text
    others = [pool.chat(m, temperature=1.0, seed=7, max_tokens=16, stream=True) for m in prompts(4)]
    b = pool.chat(HELLO, temperature=1.0, seed=42, max_tokens=16).text
    for o in others:
        list(o)
    c = pool.chat(HELLO, temperature=1.0, seed=43, max_tokens=16).text
    assert a == b
    assert a != c


def test_a_follow_up_turn_reuses_the_prompt_cache(pool):
    first = pool.chat(HELLO, temperature=0, max_tokens=8)
    follow = [*HELLO, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    second = pool.chat(follow, temperature=0, max_tokens=4)
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens >= first.usage.prompt_tokens - 1


def test_completion_works_without_a_chat_template(make_pool, tmp_path):
    from tiny_model import build_tiny_model

    p = make_pool(keep_alive=None)
    p.load(build_tiny_model(tmp_path / "plain", chat_template=False))
    with pytest.raises(ValueError, match="no chat template"):
        p.chat(HELLO)
    assert p.complete("Once upon a time", temperature=0, max_tokens=4).usage.completion_tokens == 4


@pytest.mark.parametrize(
    "params, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"stop": [""]}, "stop"),
        ({"temprature": 1}, "temprature"),
    ],
)
def test_out_of_range_parameters_name_the_field(pool, params, field):
    with pytest.raises(ValueError, match=field):
        pool.chat(HELLO, **params)


@pytest.mark.parametrize(
    "messages, field",
    [([], "messages"), ([{"role": "wizard", "content": "hi"}], "role"), ([{"role": "user"}], "content")],
)
def test_bad_messages_name_the_field(pool, messages, field):
    with pytest.raises(ValueError, match=field):
        pool.chat(messages)


def test_a_bad_role_keeps_the_message_content_out_of_the_audit_log(pool, tmp_path):
    from mlx_manager_nb.audit_log import AuditLog

    pool.audit = AuditLog(tmp_path / "audit.db")  # log_content=False
    for messages in ([{"role": "wizard", "content": "SECRET PROMPT"}], ["SECRET PROMPT"]):
        with pytest.raises(ValueError, match="role") as caught:
            pool.chat(messages)
        assert "SECRET" not in str(caught.value)
    rows = pool.audit.query()
    assert [r["error_message"].rsplit("got ", 1)[1] for r in rows] == ["a str", "'wizard'"]
    assert not any("SECRET" in str(r) for r in rows)
    pool.audit.close()


def test_unknown_model_lists_loaded_and_available(pool):
    with pytest.raises(ModelNotFoundError, match=r"nope.*Loaded: tiny"):
        pool.chat(HELLO, model="nope")


def test_timeout_ends_a_request_as_timeout(pool):
    slow = pool.chat(HELLO, temperature=0, max_tokens=480, timeout=0.001)
    assert slow.finish_reason == "timeout"


def test_async_api(pool):
    async def main():
        r = await pool.achat(HELLO, temperature=0, max_tokens=6)
        deltas = [d async for d in pool.achat(HELLO, temperature=0, max_tokens=6, stream=True)]
        s = pool.achat(HELLO, temperature=0, max_tokens=400, stream=True)
        await s.__anext__()
        await s.aclose()
        return r, deltas

    r, deltas = asyncio.run(main())
    assert "".join(deltas) == r.text and r.usage.completion_tokens == 6
    assert wait_for(lambda: pool.models()[0].in_flight == 0)


def test_models_report_measured_size_and_state(pool):
    (m,) = pool.models()
    runner = pool.engine.runner(m.name)
    from mlx.utils import tree_flatten

    assert m.state == "ready" and m.alias == "tiny"
    assert m.size_bytes == sum(v.nbytes for _, v in tree_flatten(runner.model.parameters()))
    assert pool.memory_used() == m.size_bytes


def test_load_reports_progress_and_subscribers_see_states(make_pool, copies):
    p = make_pool(keep_alive=None)
    events, progress = [], []
    p.subscribe(events.append)
    p.load(copies[0], progress=lambda stage, f: progress.append((stage, f)))
    assert progress[-1] == ("ready", 1.0)
    fractions = [f for _, f in progress]
    assert fractions == sorted(fractions)
    states = [e.state for e in events if isinstance(e, ModelEvent)]
    assert states[0] == "loading" and "ready" in states
    p.chat(HELLO, temperature=0, max_tokens=2)
    phases = [e.phase for e in events if isinstance(e, RequestEvent)]
    assert phases == ["start", "end"]
    p.unload("a")
    assert [e.state for e in events if isinstance(e, ModelEvent)][-1] == "unloaded"


def test_lru_eviction_at_max_models(make_pool, copies):
    p = make_pool(max_models=2, keep_alive=None)
    a, b, c = copies
    p.load(a)
    p.load(b)
    p.chat(HELLO, model="a", temperature=0, max_tokens=1)  # a is now the most recently used
    p.load(c)
    assert sorted(m.name for m in p.models()) == ["a", "c"]


def test_pinned_models_are_not_evicted(make_pool, copies):
    p = make_pool(max_models=2, keep_alive=None)
    a, b, c = copies
    p.load(a, pin=True)
    p.load(b)
    p.load(c)
    assert sorted(m.name for m in p.models()) == ["a", "c"]
    p.pin("c")
    with pytest.raises(PoolFullError, match=r"max_models=2.*a \(pinned"):
        p.load(b)


def test_models_with_requests_in_flight_are_not_evicted(make_pool, copies):
    p = make_pool(max_models=1, keep_alive=None)
    a, b, _ = copies
    p.load(a)
    s = p.chat(HELLO, temperature=0, max_tokens=400, stream=True)
    next(s)
    with pytest.raises(PoolFullError, match="1 in flight"):
        p.load(b)
    s.close()
    assert wait_for(lambda: p.models()[0].in_flight == 0)
    p.load(b)
    assert [m.name for m in p.models()] == ["b"]


def test_max_memory_evicts_to_make_room(make_pool, copies):
    a, b, _ = copies
    size = make_pool(keep_alive=None).load(a).size_bytes
    disk = sum(f.stat().st_size for f in a.glob("*.safetensors"))
    p = make_pool(max_memory=size + disk // 2, keep_alive=None)
    p.load(a)
    p.load(b)
    assert [m.name for m in p.models()] == ["b"]
    with pytest.raises(PoolFullError, match="max_memory"):
        make_pool(max_memory=disk // 2).load(a)


def test_idle_models_are_unloaded_after_keep_alive(make_pool, copies):
    p = make_pool(keep_alive=0.2)
    p.engine._tick_seconds = 0.1
    a, b, _ = copies
    p.load(a)
    p.load(b, pin=True)
    assert wait_for(lambda: [m.name for m in p.models()] == ["b"], timeout=5)


def test_concurrent_loads_of_one_model_load_it_once(make_pool, copies):
    p = make_pool(keep_alive=None)
    events = []
    p.subscribe(lambda e: events.append(e) if isinstance(e, ModelEvent) and e.state == "loading" else None)
    threads = [threading.Thread(target=p.load, args=(copies[0],)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(events) == 1
    assert [m.name for m in p.models()] == ["a"]


def test_a_consumer_that_breaks_fails_alone(pool):
    """A request whose event loop has gone away is dropped; the request beside it finishes."""
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def reader():
        s = pool.achat(HELLO, temperature=0, max_tokens=400, stream=True)
        await s.__anext__()
        started.set()

    loop.run_until_complete(reader())
    loop.close()  # the consumer is gone with its request still decoding
    other = pool.chat(prompts(2)[1], temperature=0, max_tokens=30)
    assert other.usage.completion_tokens == 30
    assert wait_for(lambda: pool.models()[0].in_flight == 0)


def test_a_failing_batch_step_fails_that_model_only(make_pool, copies):
    p = make_pool(keep_alive=None)
    a, b, _ = copies
    p.load(a)
    p.load(b)
    inner = p.engine.runner("a").model.model
    norm = inner.norm

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    inner.norm = broken  # an instance attribute shadows the real layer norm of model a only
    with pytest.raises(EngineError, match="boom"):
        p.chat(HELLO, model="a", temperature=0, max_tokens=3)
    assert p.chat(HELLO, model="b", temperature=0, max_tokens=3).usage.completion_tokens == 3
    del vars(inner)["norm"]
    inner.norm = norm
    assert p.chat(HELLO, model="a", temperature=0, max_tokens=3).usage.completion_tokens == 3


def test_a_dead_engine_thread_shows_in_health_and_restarts(pool, monkeypatch):
    def die(runner):
        raise SystemExit("engine bug")

    monkeypatch.setattr(pool.engine, "_step", die)
    with pytest.raises(EngineError, match="died"):
        pool.chat(HELLO, temperature=0, max_tokens=3)
    assert wait_for(lambda: not pool.engine.alive)
    assert pool.health()["engine"] == "dead"
    monkeypatch.undo()
    assert pool.chat(HELLO, temperature=0, max_tokens=3).usage.completion_tokens == 3
    assert pool.health()["engine"] == "alive"


def test_every_request_leaves_an_audit_row_even_when_refused(make_pool, tiny_model_path, audit):
    p = make_pool(keep_alive=None, audit=audit)
    p.load(tiny_model_path)
    p.chat(HELLO, temperature=0, max_tokens=3)
    s = p.chat(HELLO, temperature=0, max_tokens=400, stream=True, meta={"source": "magic"})
    next(s)
    s.close()
    with pytest.raises(ValueError):
        p.chat(HELLO, temperature=-1)
    assert wait_for(lambda: len(audit.query()) == 3)
    rows = {r["status"]: r for r in audit.query()}
    assert rows["ok"]["completion_tokens"] == 3 and rows["ok"]["source"] == "api"
    assert rows["cancelled"]["source"] == "magic"
    assert "temperature" in rows["error"]["error_message"]


def test_audit_rows_count_the_prompt_tokens_taken_from_the_cache(pool, audit):
    pool.audit = audit
    chat = [{"role": "user", "content": "tell me about caches " * 20}]
    first = pool.chat(chat, temperature=0, max_tokens=4)
    second = pool.chat(chat, temperature=0, max_tokens=4)
    assert first.usage.cached_tokens == 0 and second.usage.cached_tokens > 0
    assert wait_for(lambda: len(audit.query()) == 2)
    assert [r["cached_tokens"] for r in audit.query()] == [second.usage.cached_tokens, 0]  # newest first


def test_audit_rows_say_whether_the_answer_was_streamed(pool, audit):
    pool.audit = audit
    list(pool.chat(HELLO, temperature=0, max_tokens=2, stream=True))
    pool.chat(HELLO, temperature=0, max_tokens=2)
    with pytest.raises(ValueError):
        pool.chat(HELLO, top_p=7)
    pool.audit.flush()
    rows = pool.audit.query()
    assert [r["stream"] for r in rows if r["status"] == "ok"] == [False, True]
    assert [r["model"] for r in rows if r["status"] == "error"] == ["tiny-llama"]  # the default model
