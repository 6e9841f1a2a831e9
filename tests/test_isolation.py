"""One request can never hurt another: poisoned sampling, bounded parameters, memory, on the tiny model."""


import mlx.core as mx
import pytest
from helpers import wait_for

from mlx_manager_nb import engine
from mlx_manager_nb.errors import EngineError

HELLO = [{"role": "user", "content": "Hello"}]


def question(i):
    return [{"role": "user", "content": f"Question number {i}: {'why ' * i}?"}]


def _greedy_next_token(pool, messages, **params):
    """The token the model picks greedily after the prompt, computed on the engine thread."""
    runner = pool.engine.runner("tiny-llama")
    tokens = runner.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return pool.engine.run(lambda: mx.argmax(runner.model(mx.array([tokens]))[0, -1]).item()).result()


def _poison(monkeypatch, where):
    """Make requests with seed 666 raise inside their sampler or a logits processor."""
    real_sampler, real_processors = engine.make_sampler, engine.make_processors

    def broken(*args):
        raise RuntimeError("poisoned")

    if where == "sampler":
        monkeypatch.setattr(engine, "make_sampler", lambda p: broken if p.seed == 666 else real_sampler(p))
    else:
        monkeypatch.setattr(engine, "make_processors",
                            lambda p, n=0: [broken] if p.seed == 666 else real_processors(p, n))


@pytest.mark.parametrize("where", ["sampler", "processor"])
def test_a_request_that_breaks_sampling_fails_alone(pool, monkeypatch, where):
    expected = [pool.chat(question(i), temperature=0, max_tokens=40).text for i in range(3)]
    _poison(monkeypatch, where)
    streams = [pool.chat(question(i), temperature=0, max_tokens=40, stream=True) for i in range(3)]
    firsts = [next(s) for s in streams]  # all three are decoding
    with pytest.raises(EngineError, match="poisoned"):
        pool.chat(HELLO, temperature=1, seed=666, max_tokens=40)
    texts = [f + "".join(s) for f, s in zip(firsts, streams, strict=False)]
    assert texts == expected
    assert all(s.result.usage.completion_tokens == 40 for s in streams)
    assert pool.chat(HELLO, temperature=1, seed=1, max_tokens=5).usage.completion_tokens == 5
    assert wait_for(lambda: pool.models()[0].in_flight == 0)


def test_a_request_whose_text_handling_breaks_fails_alone(pool, monkeypatch):
    """Detokenizing and stop matching run per sequence: one that raises there ends only its request."""
    real = engine.StopMatcher

    class Broken(real):
        def feed(self, text):
            if "POISON" in self.stops:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "poisoned")
            return super().feed(text)

    monkeypatch.setattr(engine, "StopMatcher", Broken)
    expected = pool.chat(question(1), temperature=0, max_tokens=30).text
    other = pool.chat(question(1), temperature=0, max_tokens=30, stream=True)
    first = next(other)
    with pytest.raises(UnicodeDecodeError, match="poisoned"):
        pool.chat(HELLO, temperature=0, max_tokens=30, stop=["POISON"])
    assert first + "".join(other) == expected


def test_a_huge_top_k_is_clamped_and_runs_beside_others(pool):
    other = pool.chat(question(1), temperature=0, max_tokens=30, stream=True)
    next(other)
    r = pool.chat(HELLO, top_k=1_000_000_000, temperature=1, seed=3, max_tokens=10)
    assert r.usage.completion_tokens == 10
    assert pool.chat(HELLO, top_k=0, temperature=1, seed=3, max_tokens=10).text == r.text  # clamped: no filter
    list(other)
    assert other.result.usage.completion_tokens == 30


@pytest.mark.parametrize("params, field", [({"temperature": float("nan")}, "temperature"), ({"seed": -1}, "seed"),
                                           ({"logit_bias": {10**6: 1}}, "logit_bias")])
def test_bad_values_are_refused_before_the_engine(pool, params, field):
    with pytest.raises(ValueError, match=field):
        pool.chat(HELLO, **params)


def test_logit_bias_bans_and_forces_tokens(pool):
    runner = pool.engine.runner("tiny-llama")
    top = _greedy_next_token(pool, HELLO)
    alone = pool.chat(HELLO, temperature=0, max_tokens=1)
    banned = pool.chat(HELLO, temperature=0, max_tokens=1, logit_bias={top: -100})
    assert alone.text == runner.tokenizer.decode([top])
    assert banned.text != alone.text
    forced_id = runner.tokenizer.encode("Paris")[0]
    assert forced_id != top
    forced = pool.chat(HELLO, temperature=0, max_tokens=4, logit_bias={str(forced_id): 100})
    assert forced.text == runner.tokenizer.decode([forced_id] * 4)


def test_frequency_penalty_changes_a_repetitive_greedy_answer(pool):
    plain = pool.chat(HELLO, temperature=0, max_tokens=60).text
    penalized = pool.chat(HELLO, temperature=0, max_tokens=60, frequency_penalty=2, presence_penalty=2).text
    assert penalized != plain


def _token_bytes(pool):
    runner = pool.engine.runner("tiny-llama")
    return pool.engine.run(engine._kv_bytes_per_token, runner).result()


def test_requests_over_the_kv_budget_wait_and_memory_is_given_back(pool, monkeypatch):
    runner = pool.engine.runner("tiny-llama")
    expected = [pool.chat(question(i), temperature=0, max_tokens=16).text for i in range(4)]
    longest = max(pool.count_tokens(question(i)) for i in range(4)) + 16
    runner.kv_budget = budget = 8 * engine._kv_slots(longest) * _token_bytes(pool)  # eight sequences
    seen = []
    real_step = pool.engine._step

    def step(r):
        real_step(r)
        seen.append((len(r.active), r.kv_bytes, r.cache_bytes))

    monkeypatch.setattr(pool.engine, "_step", step)
    streams = [pool.chat(question(i % 4), temperature=0, max_tokens=16, stream=True) for i in range(64)]
    texts = ["".join(s) for s in streams]
    assert texts == [expected[i % 4] for i in range(64)]
    assert max(n for n, _, _ in seen) == 8  # the budget, not the batch size (32), bounded the batch
    assert max(kv + cache for _, kv, cache in seen) <= budget
    assert wait_for(lambda: pool.models()[0].kv_bytes == 0 and pool.engine.memory()["kv_bytes"] == 0)
    assert 0 < pool.models()[0].cache_bytes <= budget
    assert wait_for(lambda: mx.get_cache_memory() == 0)  # handed back once the engine went idle
    health = pool.health()
    assert health["kv_bytes"] == 0 and health["cache_bytes"] == pool.models()[0].cache_bytes
    assert health["mlx_cache_bytes"] == 0 and health["mlx_active_bytes"] > 0


def test_a_waiting_request_can_be_cancelled_or_time_out(pool):
    runner = pool.engine.runner("tiny-llama")
    runner.kv_budget = 1  # one sequence at a time
    pool.engine.unread_events = 10**6  # the first stream, read no further, keeps decoding (not parked)
    first = pool.chat(HELLO, temperature=0, max_tokens=400, stream=True)
    next(first)
    waiting = pool.chat(question(1), temperature=0, max_tokens=5, stream=True)
    assert wait_for(lambda: len(runner.waiting) == 1)
    waiting.close()
    assert wait_for(lambda: not runner.waiting and pool.models()[0].in_flight == 1)
    late = pool.chat(question(2), temperature=0, max_tokens=5, timeout=0.05)
    assert late.finish_reason == "timeout" and late.usage.completion_tokens == 0
    assert first.result is None  # both ended while the first was still decoding
    first.close()


def test_the_prompt_cache_holds_only_its_own_bytes(pool):
    """Cached KV is copied out of the batch at once, so finished batches do not stay alive behind it."""
    def burst(first):
        for s in [pool.chat(question(i), temperature=0, max_tokens=40, stream=True) for i in range(first, first + 12)]:
            list(s)
        assert wait_for(lambda: mx.get_cache_memory() == 0)
        return mx.get_active_memory() - pool.models()[0].cache_bytes

    before = burst(0)
    held = burst(12) - before
    # a lazy slice would keep a 12-sequence batch buffer (about 1.5 MiB for the tiny model) alive here; other
    # pools of the same process may move a few tens of KiB meanwhile (94 KiB was seen once in the full suite)
    assert held < 256 * 1024, held


MEMORY_SCRIPT = """
import json, os, threading, time
from mlx_manager_nb import Pool

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

pool = Pool(keep_alive=None, max_memory=2 * 2**30, max_models=2)
pool.load("demo")
pool.chat([{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0)
weights, budget, base = pool.models()[0].size_bytes, pool.max_memory // pool.max_models, rss()
kv_seen = []
threads = [threading.Thread(target=pool.chat, args=([{"role": "user", "content": f"Tell me about {i}."}],),
                            kwargs={"max_tokens": 16, "temperature": 0}) for i in range(64)]
for t in threads:
    t.start()
while any(t.is_alive() for t in threads):
    kv_seen.append(pool.models()[0].kv_bytes + pool.models()[0].cache_bytes)
    time.sleep(0.05)
time.sleep(3)  # idle: the engine hands its spare buffers back
print(json.dumps({"weights": weights, "budget": budget, "base": base, "after": rss(), "kv_max": max(kv_seen)}))
"""


@pytest.mark.slow
def test_memory_stays_in_budget_and_is_given_back_after_64_requests(demo_home):
    import json
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MLX_NB_HOME": str(demo_home)})
    assert done.returncode == 0, done.stderr
    m = json.loads(done.stdout.strip().splitlines()[-1])
    assert m["kv_max"] <= m["budget"], m
    # after idle, RSS is within 25% of weights plus the prompt cache bound (its share of the budget)
    assert m["after"] <= 1.25 * (m["weights"] + m["budget"]), m
