"""Limits per client and per model (a 429 with retry-after, which the SDKs honour), refused 401s counted in
one row, and the operator's models kept through clients' auto-loads: real servers, the official SDKs."""

import contextlib
import json
import shutil
import socket
import threading
import time

import anthropic
import httpx
import openai
import pytest
from helpers import call, slow_upload, wait_for

from mlx_manager_nb import store
from mlx_manager_nb.server import serve
from mlx_manager_nb.server.common import LIMITS

HI = [{"role": "user", "content": "Hi"}]
BODY = json.dumps({"model": "tiny", "messages": HI, "max_tokens": 2, "temperature": 0}).encode()


def other_address_client() -> httpx.Client:
    """An HTTP client whose requests come from 127.0.0.2: another client, as far as the server can tell."""
    try:
        socket.create_connection(("127.0.0.2", 9), timeout=0.5).close()
    except ConnectionRefusedError:
        pass  # the address exists (nothing listens on port 9)
    except OSError:
        pytest.skip("127.0.0.2 is not a loopback address here (macOS has only 127.0.0.1)")
    return httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))


def test_a_client_past_its_limit_gets_a_429_in_each_protocol(pool, audit):
    s = serve(pool, port=0, mode="thread", max_client_requests=1)
    try:
        with slow_upload(s.port) as held:
            assert wait_for(lambda: s._v1[LIMITS].running.get("127.0.0.1") == 1)
            oa = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.RateLimitError) as refused:
                oa.chat.completions.create(model="tiny", messages=HI, max_tokens=2)
            assert refused.value.status_code == 429 and refused.value.response.headers["retry-after"] == "1"
            assert refused.value.body["type"] == "rate_limit_error" and "max_client_requests" in refused.value.message
            an = anthropic.Anthropic(base_url=s.url, api_key="unused", max_retries=0)
            with pytest.raises(anthropic.RateLimitError) as refused:
                an.messages.create(model="tiny", max_tokens=2, messages=HI)
            assert refused.value.response.headers["retry-after"] == "1"
            assert refused.value.body["error"]["type"] == "rate_limit_error"
            # the notebook is never limited
            assert pool.chat(HI, max_tokens=2, temperature=0).usage.completion_tokens == 2
        assert held == [200]  # the held request itself went on
        assert oa.chat.completions.create(model="tiny", messages=HI, max_tokens=2).usage.completion_tokens == 2
    finally:
        s.stop(drain=0)
    refusals = [r for r in audit.query(limit=None) if r["http_status"] == 429]
    assert [(r["source"], r["protocol"]) for r in refusals] == [("http", "anthropic"), ("http", "openai")]


def test_the_sdks_retry_after_the_429_and_get_through(pool, audit):
    s = serve(pool, port=0, mode="thread", max_client_requests=1)
    try:
        for client, ask in [
            (openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=2),
             lambda c: c.chat.completions.create(model="tiny", messages=HI, max_tokens=2).usage.completion_tokens),
            (anthropic.Anthropic(base_url=s.url, api_key="unused", max_retries=2),
             lambda c: c.messages.create(model="tiny", max_tokens=2, messages=HI).usage.output_tokens),
        ]:
            upload = slow_upload(s.port)
            upload.__enter__()
            assert wait_for(lambda: s._v1[LIMITS].running.get("127.0.0.1") == 1)
            threading.Timer(0.3, upload.__exit__, (None, None, None)).start()  # the other request ends soon
            started = time.monotonic()
            assert ask(client) == 2
            assert time.monotonic() - started >= 1  # it waited as retry-after said, then got through
    finally:
        s.stop(drain=0)
    assert sum(r["http_status"] == 429 for r in audit.query(limit=None)) == 2


def test_a_bystander_is_unaffected_by_another_clients_runaway(pool):
    bystander = openai.OpenAI(base_url="", api_key="unused", max_retries=0, http_client=other_address_client())
    s = serve(pool, port=0, mode="thread", max_client_requests=2)
    try:
        bystander.base_url = s.url + "/v1"
        with slow_upload(s.port), slow_upload(s.port):  # the runaway: every slot of 127.0.0.1 held
            assert wait_for(lambda: s._v1[LIMITS].running.get("127.0.0.1") == 2)
            assert call(s.url + "/v1/chat/completions", json.loads(BODY))[0] == 429
            for _ in range(3):
                r = bystander.chat.completions.create(model="tiny", messages=HI, max_tokens=2)
                assert r.usage.completion_tokens == 2
    finally:
        s.stop(drain=0)


@contextlib.contextmanager
def slow_steps(pool, seconds=0.02):
    """Each decoding step of the tiny model takes ``seconds`` longer (its final norm sleeps first)."""
    inner = pool.engine.runner("tiny-llama").model.model
    norm = inner.norm

    def slow(x):
        time.sleep(seconds)
        return norm(x)

    inner.norm = slow
    try:
        yield
    finally:
        del vars(inner)["norm"]
        inner.norm = norm


def test_a_model_with_a_full_queue_refuses_http_requests_but_never_the_notebook(pool, audit):
    runner = pool.engine.runner("tiny-llama")
    budget, runner.kv_budget = runner.kv_budget, 1  # one sequence at a time: the others wait
    s = serve(pool, port=0, mode="thread", max_model_queue=1)
    oa = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    try:
        with slow_steps(pool):
            holder = pool.chat(HI, max_tokens=400, temperature=0, stream=True)  # runs, slowly
            next(iter(holder))
            waiting = threading.Thread(target=lambda: oa.chat.completions.create(model="tiny", messages=HI,
                                                                                 max_tokens=2))
            waiting.start()
            assert wait_for(lambda: len(runner.waiting) == 1)
            with pytest.raises(openai.RateLimitError) as refused:
                oa.chat.completions.create(model="tiny", messages=HI, max_tokens=2)
            assert refused.value.response.headers["retry-after"] == "1" and "max_model_queue" in refused.value.message
            code, headers, err = call(s.url + "/v1/messages", {"model": "tiny", "max_tokens": 2, "messages": HI})
            assert code == 429 and err["error"]["type"] == "rate_limit_error" and headers["retry-after"] == "1"
            notebook = []
            later = threading.Thread(target=lambda: notebook.append(pool.chat(HI, max_tokens=2, temperature=0)))
            later.start()  # the notebook queues past the bound: it is never refused
            assert wait_for(lambda: len(runner.waiting) == 2)
            holder.close()
            later.join(30)
            waiting.join(30)
        assert notebook[0].usage.completion_tokens == 2
    finally:
        runner.kv_budget = budget
        s.stop(drain=0)
    assert sorted(r["protocol"] for r in audit.query(limit=None) if r["http_status"] == 429) == ["anthropic", "openai"]


def test_twenty_unauthenticated_requests_leave_one_counted_row(pool, audit):
    s = serve(pool, port=0, mode="thread", api_key="k")
    try:
        for _ in range(20):
            assert call(s.url + "/v1/chat/completions", json.loads(BODY))[0] == 401
        assert call(s.url + "/v1/chat/completions", json.loads(BODY), {"authorization": "Bearer k"})[0] == 200
    finally:
        s.stop(drain=0)
    rows = audit.query(limit=None)
    assert len(rows) == 2
    refused = next(r for r in rows if r["http_status"] == 401)
    assert refused["count"] == 20 and refused["client"] == "127.0.0.1" and refused["status"] == "error"
    assert next(r for r in rows if r["http_status"] == 200)["count"] == 1
    [stats] = audit.stats()
    assert stats["requests"] == 21 and stats["errors"] == 20


# -- the operator's models stay --------------------------------------------------------------------


def test_auto_loads_evict_only_each_other_never_the_operators_models(make_pool, tiny_model_path, tmp_path, audit):
    p = make_pool(max_models=3, keep_alive=None, audit=audit)
    shutil.copytree(tiny_model_path, tmp_path / "mine")
    p.load(tiny_model_path, alias="tiny")  # the operator's, as pool.load, --model, the panel and %mlx load do
    p.load(tmp_path / "mine")
    for name in ("s1", "s2", "s3", "s4"):
        shutil.copytree(tiny_model_path, store.models_dir() / name)
    s = serve(p, port=0, mode="thread")
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    try:
        for name in ("s1", "s2", "s3"):
            assert client.chat.completions.create(model=name, messages=HI, max_tokens=1).model == name
            models = {m.name: m.auto_loaded for m in p.models()}
            assert models == {"tiny-llama": False, "mine": False, name: True}  # it evicted the one before
        p.load("s1")  # the operator's load makes room by evicting the client's model first
        assert {m.name: m.auto_loaded for m in p.models()} == {"tiny-llama": False, "mine": False, "s1": False}
        with pytest.raises(openai.InternalServerError) as refused:  # every model now is the operator's
            client.chat.completions.create(model="s4", messages=HI, max_tokens=1)
        assert refused.value.status_code == 503 and "loaded by the user" in refused.value.message
        code, _, err = call(s.url + "/v1/messages", {"model": "s4", "max_tokens": 1, "messages": HI})
        assert code == 529 and err["error"]["type"] == "overloaded_error" and "tiny-llama" in err["error"]["message"]
        assert client.chat.completions.create(model="s1", messages=HI, max_tokens=1).model == "s1"
        assert sorted(m.name for m in p.models()) == ["mine", "s1", "tiny-llama"]
    finally:
        s.stop(drain=0)


def test_a_model_loaded_by_a_client_becomes_the_operators_when_the_operator_loads_it(make_pool, tiny_model_path):
    p = make_pool(max_models=2, keep_alive=None)
    p.load(tiny_model_path)
    shutil.copytree(tiny_model_path, store.models_dir() / "s1")
    shutil.copytree(tiny_model_path, store.models_dir() / "s2")
    s = serve(p, port=0, mode="thread")
    try:
        assert call(s.url + "/v1/chat/completions", {"model": "s1", "messages": HI, "max_tokens": 1})[0] == 200
        assert p.lookup("s1").auto_loaded
        p.load("s1")
        assert not p.lookup("s1").auto_loaded
        assert call(s.url + "/v1/chat/completions", {"model": "s2", "messages": HI, "max_tokens": 1})[0] == 503
        assert call(s.url + "/v1/chat/completions", {"model": "s1", "messages": HI, "max_tokens": 1})[0] == 200
        assert not p.lookup("s1").auto_loaded  # a client's request does not make it the client's again
    finally:
        s.stop(drain=0)
