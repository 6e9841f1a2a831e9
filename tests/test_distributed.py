"""Sharded models (two local ranks over mlx.launch's ring backend) and attached servers, as pool entries."""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import call, free_port, wait_for

from mlx_manager_nb.errors import EngineError, InvalidParameterError, UnsupportedModelError

HOSTS = ["127.0.0.1", "127.0.0.1"]
PROMPTS = ["Hello world", "The capital of France", "def add(a, b):", "Once upon a time", "0123456789"]


def no_eos(pool, model):
    """A logit_bias that keeps ``model`` from ending early, so streams run long enough to cancel or break."""
    return {pool.runner(pool.find(model).name).tokenizer.eos_token_id: -100}


@pytest.fixture(scope="module")
def tiny_qwen_path(tmp_path_factory):
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen2", model_type="qwen2")


@pytest.fixture(scope="module")
def sharded(tiny_model_path, tmp_path_factory):
    """A pool with the tiny llama loaded locally ("tiny") and tensor-sharded over two local ranks."""
    from mlx_manager_nb.audit_log import AuditLog
    from mlx_manager_nb.model_pool import Pool

    audit = AuditLog(tmp_path_factory.mktemp("audit") / "audit.db")
    pool = Pool(keep_alive=None, audit=audit)
    pool.load(tiny_model_path, alias="tiny")
    info = pool.load(tiny_model_path, hosts=HOSTS, parallel="tensor")
    yield pool, info.name
    remote = pool._remote.get(info.name)
    pool.close()
    assert remote is None or wait_for(lambda: remote.process.poll() is not None, 15), "unload did not end the job"
    audit.close()


def test_tensor_greedy_equals_one_process(sharded):
    pool, name = sharded
    for prompt in PROMPTS:
        one = pool.complete(prompt, model="tiny", temperature=0, max_tokens=24)
        two = pool.complete(prompt, model=name, temperature=0, max_tokens=24)
        assert (two.text, two.usage, two.finish_reason) == (one.text, one.usage, one.finish_reason)
    seeded = dict(temperature=0.9, top_p=0.9, seed=7, stop=["e"], max_tokens=24)  # sampling and stops, too
    one, two = pool.complete("Hello", model="tiny", **seeded), pool.complete("Hello", model=name, **seeded)
    assert (two.text, two.stop) == (one.text, one.stop)
    info = next(m for m in pool.models() if m.name == name)
    assert info.placement == "sharded" and info.hosts == tuple(HOSTS)
    assert [r["rank"] for r in info.ranks] == [0, 1] and all(r["state"] == "ready" for r in info.ranks)


def test_four_concurrent_streams_batch_across_ranks(sharded):
    pool, name = sharded
    expected = [pool.complete(p, model="tiny", temperature=0, max_tokens=40).text for p in PROMPTS[:4]]
    order = []

    async def one(i):
        s = pool.acomplete(PROMPTS[i], model=name, stream=True, temperature=0, max_tokens=40)
        async for _ in s:
            order.append(i)
        return s.result

    async def main():
        return await asyncio.gather(*(one(i) for i in range(4)))

    results = asyncio.run(main())
    assert [r.text for r in results] == expected
    first_finisher = min(range(4), key=lambda i: max(j for j, k in enumerate(order) if k == i))
    last_of_first = max(j for j, k in enumerate(order) if k == first_finisher)
    assert set(order[:last_of_first]) == {0, 1, 2, 3}, "the four streams did not decode together"


def test_cancel_mid_stream_frees_the_slot_on_every_rank(sharded):
    pool, name = sharded
    s = pool.complete("Once", model=name, stream=True, temperature=0, max_tokens=400, logit_bias=no_eos(pool, name))
    for i, _ in enumerate(s):
        if i == 2:
            break
    s.close()
    after = time.time()
    assert wait_for(lambda: pool.audit.flush() and any(
        r["model"] == name and r["status"] == "cancelled" for r in pool.audit.query()), 10)
    ranks = lambda: next(m for m in pool.models() if m.name == name).ranks  # noqa: E731
    assert wait_for(lambda: all(r.get("reported_at", 0) > after and r["sequences"] == 0 for r in ranks()), 10)
    assert pool.complete("Hello", model=name, temperature=0, max_tokens=5).usage.completion_tokens == 5


def test_http_server_serves_the_sharded_model(sharded):
    from mlx_manager_nb.server import serve

    pool, name = sharded
    server = serve(pool, port=0, mode="thread")
    try:
        status, _, models = call(f"{server.url}/v1/models", method="GET")
        assert name in [m["id"] for m in models["data"]]
        status, _, body = call(f"{server.url}/v1/completions",
                               {"model": name, "prompt": "Hello world", "temperature": 0, "max_tokens": 8})
        assert status == 200
        assert body["choices"][0]["text"] == pool.complete("Hello world", model="tiny", temperature=0,
                                                           max_tokens=8).text
    finally:
        server.stop(drain=0)


def test_a_dead_rank_fails_its_requests_and_the_model_only(make_pool, tiny_model_path):
    pool = make_pool(keep_alive=None)
    pool.load(tiny_model_path, alias="tiny")
    name = pool.load(tiny_model_path, hosts=HOSTS).name
    s = pool.complete("Once", model=name, stream=True, temperature=0, max_tokens=480, logit_bias=no_eos(pool, name))
    next(s)
    rank1 = next(m for m in pool.models() if m.name == name).ranks[1]["pid"]
    os.kill(rank1, signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(EngineError, match=r"rank 1 \(127.0.0.1\) exited with code -9"):
        for _ in s:
            pass
    assert time.monotonic() - killed < 30  # at once (about a second idle), not hung waiting for the dead rank
    info = next(m for m in pool.models() if m.name == name)
    assert info.state == "failed" and "rank 1" in info.error
    assert pool.complete("Hello", model="tiny", temperature=0, max_tokens=4).usage.completion_tokens == 4
    pool.unload(name)
    assert name not in [m.name for m in pool.models()]


def test_pipeline_is_refused_for_llama_naming_the_families(make_pool, tiny_model_path):
    with pytest.raises(UnsupportedModelError, match=r"no pipeline parallelism for 'llama'.*qwen2"):
        make_pool().load(tiny_model_path, hosts=HOSTS, parallel="pipeline")


def test_pipeline_greedy_equals_one_process_and_cancels(make_pool, tiny_qwen_path):
    pool = make_pool(keep_alive=None)
    pool.load(tiny_qwen_path, alias="q")
    name = pool.load(tiny_qwen_path, hosts=HOSTS, parallel="pipeline").name
    for prompt in PROMPTS:
        one = pool.complete(prompt, model="q", temperature=0, max_tokens=24)
        two = pool.complete(prompt, model=name, temperature=0, max_tokens=24)
        assert (two.text, two.usage) == (one.text, one.usage)
    s = pool.complete("Once", model=name, stream=True, temperature=0, max_tokens=400, logit_bias=no_eos(pool, name))
    next(s)
    s.close()
    assert pool.complete("Hello", model=name, temperature=0, max_tokens=6).text == pool.complete(
        "Hello", model="q", temperature=0, max_tokens=6).text


@pytest.fixture
def other_server(tiny_model_path, tmp_path, ctrl_c_works):
    """A second process running ``python -m mlx_manager_nb serve`` on the tiny model, with an API key."""
    port, home = free_port(), tmp_path / "other-home"
    env = {**os.environ, "MLX_NB_HOME": str(home)}
    process = subprocess.Popen([sys.executable, "-m", "mlx_manager_nb", "serve", "--model", str(tiny_model_path),
                                "--port", str(port), "--api-key", "secret"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in process.stdout:
        if b"Serving" in line:
            break
    yield f"http://127.0.0.1:{port}/v1", home
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    finally:
        process.kill()  # a no-op once it stopped; one that did not must not outlive the test


def test_attach_proxies_chat_stream_and_cancel_with_audit_on_both_sides(make_pool, audit, other_server):
    from mlx_manager_nb.audit_log import AuditLog

    base_url, home = other_server
    pool = make_pool(keep_alive=None, audit=audit)
    info = pool.attach("far", base_url=base_url, api_key="secret")
    assert (info.placement, info.state) == ("attached", "ready")
    r = pool.chat([{"role": "user", "content": "Hi"}], model="far", temperature=0, max_tokens=12)
    assert r.usage.completion_tokens > 0 and r.text
    s = pool.chat([{"role": "user", "content": "Hi"}], model="far", stream=True, temperature=0, max_tokens=12)
    assert "".join(s) == r.text and s.result.usage.completion_tokens == r.usage.completion_tokens
    assert s.result.usage.cached_tokens > 0  # the server's prompt cache, reported through
    s = pool.complete("Once", model="far", stream=True, temperature=0, max_tokens=400, logit_bias={2: -100})
    next(s)
    s.close()
    assert wait_for(lambda: audit.flush() and len(audit.query()) == 3, 10)
    assert sorted(row["status"] for row in audit.query()) == ["cancelled", "ok", "ok"]
    assert {row["model"] for row in audit.query()} == {"far"}
    remote = AuditLog(home / "audit.db")
    try:
        assert wait_for(lambda: sorted(row["status"] for row in remote.query()) == ["cancelled", "ok", "ok"], 10)
    finally:
        remote.close()
    with pytest.raises(Exception, match="does not serve 'nope'"):
        pool.attach("nope", base_url=base_url, api_key="secret", model="nope")


def test_attach_picks_the_only_model_of_a_server_that_lists_it_under_an_alias_too(make_pool, server):
    # the server lists the tiny model as "tiny" and under its folder's name
    listed = call(server.url + "/v1/models", method="GET")[2]["data"]
    assert len(listed) == 2 and len({m["root"] for m in listed}) == 1
    pool = make_pool(keep_alive=None)
    pool.attach("far", base_url=server.url + "/v1")
    assert pool.chat([{"role": "user", "content": "Hi"}], model="far", max_tokens=2).usage.completion_tokens == 2


def test_logprobs_and_scoring_on_an_attached_model_are_refused_naming_the_field(make_pool, server):
    pool = make_pool(keep_alive=None)
    pool.attach("far", base_url=server.url + "/v1")
    with pytest.raises(InvalidParameterError, match="other processes") as caught:
        pool.chat([{"role": "user", "content": "Hi"}], model="far", max_tokens=2, logprobs=True)
    assert caught.value.param == "logprobs"
    with pytest.raises(InvalidParameterError, match="other processes") as caught:
        pool.score("Hello world", model="far")
    assert caught.value.param == "model"


def test_a_model_whose_heads_do_not_split_over_the_ranks_is_refused_at_load(make_pool, tmp_path):
    from tiny_model import build_tiny_model

    path = build_tiny_model(tmp_path / "tiny-3-heads", hidden_size=48, num_attention_heads=3, num_key_value_heads=3)
    pool = make_pool(keep_alive=None)
    with pytest.raises(UnsupportedModelError, match=r"3 attention heads do not divide by 2 ranks"):
        pool.load(path, hosts=HOSTS, parallel="tensor")
    assert pool.models() == []
    assert pool.load(path).name  # the model itself is fine in one process


def _channel_ports() -> set[int]:
    """The ports of this process's sharded-load sockets, read from ``ps`` as any local process can."""
    listing = subprocess.run(["ps", "-ww", "-eo", "ppid=,args="], capture_output=True, text=True).stdout
    ports = set()
    for line in listing.splitlines():
        ppid, _, args = line.strip().partition(" ")
        port = re.search(r"mlx_manager_nb\.distributed\.worker .*--port (\d+)", args)
        if int(ppid) == os.getpid() and port:
            ports.add(int(port.group(1)))
    return ports


def _seconds_until_closed(sock: socket.socket) -> float:
    start = time.monotonic()
    try:
        while sock.recv(4096):
            pass
    except OSError:  # reset
        pass
    sock.close()
    return time.monotonic() - start


def test_local_processes_on_the_channel_are_cut_and_the_load_goes_on(make_pool, tiny_model_path):
    from mlx_manager_nb.distributed.sharded import HELLO_WAIT

    closed: dict[str, float] = {}
    earlier = _channel_ports()  # jobs of other tests

    def attack():
        end = time.monotonic() + 60
        while not (_channel_ports() - earlier) and time.monotonic() < end:
            time.sleep(0.01)
        port, = _channel_ports() - earlier
        sends = {"silent": b"", "not json": b"GET / HTTP/1.1\r\n\r\n", "a wrong token": b'{"event": "hello", '
                 b'"token": "\xc3\xa9t\xc3\xa9"}\n', "no line end": b"x" * 10_000, "a list": b"[1]\n"}
        socks = {}
        for what, data in sends.items():
            socks[what] = socket.create_connection(("127.0.0.1", port), timeout=60)
            socks[what].sendall(data)
        for what, sock in socks.items():
            closed[what] = _seconds_until_closed(sock)

    attacker = threading.Thread(target=attack)
    attacker.start()
    pool = make_pool(keep_alive=None)
    start = time.monotonic()
    name = pool.load(tiny_model_path, hosts=HOSTS).name
    loaded = time.monotonic() - start
    attacker.join(60)
    assert set(closed) == {"silent", "not json", "a wrong token", "no line end", "a list"}
    assert all(seconds < HELLO_WAIT + 2 for seconds in closed.values()), closed
    assert loaded < 120
    assert pool.complete("Hello", model=name, temperature=0, max_tokens=4).usage.completion_tokens == 4
