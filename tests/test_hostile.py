"""Every bad input a 4xx in the protocol's own shape, while other requests keep streaming unharmed."""

import asyncio
import json
import shutil
import socket
import time
import urllib.error
import urllib.request

import aiohttp
import anthropic
import openai
import pytest
from helpers import HI, call, raw_http, with_bystanders

from mlx_manager_nb.errors import InvalidModelError
from mlx_manager_nb.server import serve

ANTHROPIC = {"anthropic-version": "2023-06-01"}


def chat(**extra):
    return {"model": "tiny", "messages": HI, "max_tokens": 3, **extra}


async def post_raw(http, url, data, headers=None):
    async with http.post(url, data=data, headers={"content-type": "application/json", **(headers or {})}) as r:
        return r.status, await r.json()


# -- bad bodies ------------------------------------------------------------------------------------


def test_json_nested_100000_deep_is_a_400(server, pool):
    deep = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, body = with_bystanders(server, pool, lambda http: post_raw(http, server.url + "/v1/chat/completions",
                                                                          deep))
    assert status == 400 and "nested too deeply" in body["error"]["message"]


def test_a_lone_surrogate_is_a_400_naming_the_field(server, pool):
    raw = b'{"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi \\ud800"}]}'
    status, body = with_bystanders(server, pool, lambda http: post_raw(http, server.url + "/v1/chat/completions",
                                                                          raw))
    assert status == 400 and body["error"]["param"] == "messages[0].content"
    assert call(server.url + "/v1/chat/completions", chat())[0] == 200


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_numbers_are_a_400_naming_the_field(server, literal):
    raw = b'{"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}], "temperature": '
    status, _, body = call(server.url + "/v1/chat/completions", raw=raw + literal + b"}")
    assert status == 400
    if literal == b"1e400":
        assert body["error"]["param"] == "temperature"


def test_a_300_character_model_name_is_a_404(server):
    status, _, body = call(server.url + "/v1/chat/completions", {**chat(), "model": "m" * 300})
    assert status == 404 and body["error"]["param"] == "model" and len(body["error"]["message"]) < 500


def test_a_model_whose_chat_template_does_not_render_is_refused_at_load(make_pool, tiny_model_path, tmp_path):
    broken = tmp_path / "broken-template"
    shutil.copytree(tiny_model_path, broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('no chats here') }}"
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    p = make_pool(keep_alive=None)
    with pytest.raises(InvalidModelError, match=r"broken-template.*chat template does not render"):
        p.load(broken)
    assert p.models() == []


@pytest.mark.parametrize("field", ["max_completion_tokens", "max_tokens"])
def test_zero_max_tokens_is_a_400(server, field):
    status, _, body = call(server.url + "/v1/chat/completions", {**chat(), field: 0})
    assert status == 400 and body["error"]["param"] == field


@pytest.mark.parametrize("path,field,value", [
    ("/v1/chat/completions", "n", 2),
    ("/v1/completions", "suffix", "end"),
    ("/v1/completions", "best_of", 3),
])
def test_parameters_that_change_the_result_are_never_ignored(server, path, field, value):
    body = {**chat(), field: value} if "chat" in path else {"model": "tiny", "prompt": "Hi", "max_tokens": 2,
                                                            field: value}
    status, _, answer = call(server.url + path, body)
    assert status == 400 and answer["error"]["param"] == field and "not supported" in answer["error"]["message"]


@pytest.mark.parametrize("path,extra,headers", [
    ("/v1/chat/completions", {"tool_choice": "none"}, {}),
    ("/v1/chat/completions", {"response_format": {"type": "text"}}, {}),
    ("/v1/chat/completions", {"modalities": ["text"]}, {}),
    ("/v1/chat/completions", {"messages": [*HI, {"role": "assistant", "content": None}, *HI]}, {}),
    ("/v1/messages", {"thinking": {"type": "disabled"}}, ANTHROPIC),
    ("/v1/messages", {"tool_choice": {"type": "none"}}, ANTHROPIC),
])
def test_values_that_ask_for_nothing_are_accepted(server, path, extra, headers):
    status, _, body = call(server.url + path, {**chat(), **extra}, headers)
    assert status == 200, body


# -- protocol edges --------------------------------------------------------------------------------


def test_unknown_routes_and_methods_answer_in_the_protocols_shape(server):
    status, headers, body = call(server.url + "/v1/nope", {})
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    assert headers["Content-Type"].startswith("application/json")
    status, _, body = call(server.url + "/v1/messages/nope", {})
    assert status == 404 and body["type"] == "error" and body["error"]["type"] == "not_found_error"
    status, headers, body = call(server.url + "/v1/chat/completions", method="GET")
    assert status == 405 and "error" in body and "POST" in headers["Allow"]


def test_models_retrieve_in_both_sdks(server, pool):
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    assert oa.models.retrieve("tiny").id == "tiny"
    assert {"tiny", "tiny-llama"} <= {m.id for m in oa.models.list()}
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("nope")
    an = anthropic.Anthropic(base_url=server.url, api_key="x")
    info = an.models.retrieve("tiny")
    assert info.id == "tiny" and info.type == "model" and info.display_name
    page = an.models.list()
    assert "tiny" in [m.id for m in page.data] and page.has_more is False and page.first_id == page.data[0].id
    with pytest.raises(anthropic.NotFoundError):
        an.models.retrieve("nope")


def test_field_errors_name_their_param(server):
    for extra, param in (({"temperature": -1}, "temperature"), ({"top_p": 5}, "top_p"),
                         ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content")):
        status, _, body = call(server.url + "/v1/chat/completions", {**chat(), **extra})
        assert status == 400 and body["error"]["param"] == param, body


def test_context_overflow_is_recognised_by_clients(server, monkeypatch):
    long = [{"role": "user", "content": "word " * 2000}]  # the tiny model's context is 512
    status, _, body = call(server.url + "/v1/chat/completions", {**chat(), "messages": long})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, _, body = call(server.url + "/v1/messages", {**chat(), "messages": long}, ANTHROPIC)
    assert status == 400 and body["error"]["message"].startswith("prompt is too long: ")
    assert body["error"]["message"].endswith(" > 512 maximum")

    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of litellm's price list
    import litellm
    from langchain_anthropic import ChatAnthropic
    from langchain_core.exceptions import ContextOverflowError
    from langchain_openai import ChatOpenAI

    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model="openai/tiny", api_base=server.url + "/v1", api_key="x", messages=long,
                           max_tokens=3)
    with pytest.raises(ContextOverflowError):
        ChatOpenAI(model="tiny", base_url=server.url + "/v1", api_key="x", max_retries=0).invoke(long)
    with pytest.raises(ContextOverflowError):
        ChatAnthropic(model="tiny", base_url=server.url, api_key="x", max_retries=0).invoke(long)


def test_anthropic_streams_report_input_tokens_and_a_request_id(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="x")
    with client.messages.stream(model="tiny", max_tokens=3, messages=HI) as stream:
        events = list(stream)
    delta = next(e for e in events if e.type == "message_delta")
    assert delta.usage.input_tokens and delta.usage.input_tokens == events[0].message.usage.input_tokens
    raw = client.messages.with_raw_response.create(model="tiny", max_tokens=3, messages=HI)
    assert raw.headers["request-id"].startswith("req_")


# -- work proportional to input size never stalls the loop -----------------------------------------


def health_while(server, pool, path, data, headers=None):
    """Post ``data`` to ``path`` beside bystander streams, calling /health meanwhile: its answer, and
    whether /health kept answering. Work on the event loop would hold every /health behind it for most
    of the request; the floor is what a machine shared with other jobs adds to one small request."""
    async def hostile(http):
        started = time.perf_counter()
        posted = asyncio.create_task(post_raw(http, server.url + path, data, headers))
        latencies = []
        while not posted.done():
            start = time.perf_counter()
            async with http.get(server.url + "/health") as r:
                assert r.status == 200
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(0.01)
        return await posted, latencies, time.perf_counter() - started

    answer, latencies, took = with_bystanders(server, pool, hostile)
    assert latencies and max(latencies) < max(0.5, took / 2), (latencies, took)
    return answer


def test_health_answers_while_a_7mb_prompt_is_refused(server, pool):
    huge = json.dumps({**chat(), "messages": [{"role": "user", "content": "x" * 7_000_000}]}).encode()
    status, body = health_while(server, pool, "/v1/chat/completions", huge)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"


def _schema(i):
    return {"type": "object", "properties": {f"p{j}": {"type": "string", "enum": [f"v{i}-{j}-{k}" for k in range(30)]}
                                             for j in range(24)}, "required": ["p0"]}


TOOLS_BODIES = {  # n tools, the i-th with schema(i), in each protocol's shape
    "/v1/chat/completions": lambda n, schema: {**chat(), "tools": [
        {"type": "function", "function": {"name": f"t{i}", "parameters": schema(i)}} for i in range(n)]},
    "/v1/messages": lambda n, schema: {**chat(), "tools": [{"name": f"t{i}", "input_schema": schema(i)}
                                                           for i in range(n)]},
    "/v1/responses": lambda n, schema: {"model": "tiny", "input": "Hi", "max_output_tokens": 3, "tools": [
        {"type": "function", "name": f"t{i}", "parameters": schema(i)} for i in range(n)]},
}


@pytest.mark.parametrize("path", TOOLS_BODIES)
def test_health_answers_while_128_tools_are_checked(server, pool, path):
    body = TOOLS_BODIES[path](128, _schema)  # the most allowed, each a distinct schema to check
    status, _ = health_while(server, pool, path, json.dumps(body).encode(), ANTHROPIC)
    assert status in (200, 400)  # answered, or the listing is longer than the tiny model's context


@pytest.mark.parametrize("path", TOOLS_BODIES)
def test_more_than_128_tools_are_refused_before_any_is_checked(server, path):
    def schema(i):  # the first is invalid: checking tools one by one would answer about it instead
        return {"type": "object", "properties": 5} if i == 0 else {"type": "object", "title": f"t{i}"}

    status, _, answer = call(server.url + path, TOOLS_BODIES[path](20_000, schema), ANTHROPIC)
    assert status == 400 and "20000 tools; at most 128" in json.dumps(answer)


def test_count_tokens_of_a_large_body_does_not_block(server):
    big = {"model": "tiny", "messages": [{"role": "user", "content": "hello " * 200_000}]}
    status, _, body = call(server.url + "/v1/messages/count_tokens", big, ANTHROPIC)
    assert status == 200 and body["input_tokens"] > 200_000


def test_a_non_streamed_request_is_cancelled_when_its_client_leaves(server, pool, audit):
    body = json.dumps({**chat(), "max_tokens": 400, "temperature": 0}).encode()
    request = urllib.request.Request(server.url + "/v1/chat/completions", body, {"content-type": "application/json"})
    with pytest.raises(OSError):  # the client gives up, as a timeout would make it
        urllib.request.urlopen(request, timeout=0.3)
    deadline = time.monotonic() + 10
    while pool.models()[0].in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.models()[0].in_flight == 0
    (row,) = audit.query()
    assert row["status"] == "cancelled" and row["completion_tokens"] < 400


# -- sampling parameters that once poisoned the batch ------------------------------------------------


def test_a_huge_top_k_runs_alone_and_harms_no_bystander(server, pool):
    body = json.dumps({**chat(), "top_k": 1_000_000_000, "temperature": 1}).encode()
    status, answer = with_bystanders(server, pool, lambda http: post_raw(http, server.url + "/v1/chat/completions",
                                                                            body))
    assert status == 200 and answer["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("stop", [["x" * 1_000_000], ["a"] * 17])
def test_oversized_stop_strings_are_a_400_beside_bystanders(server, pool, stop):
    body = json.dumps({**chat(), "stop": stop}).encode()
    status, answer = with_bystanders(server, pool, lambda http: post_raw(http, server.url + "/v1/chat/completions",
                                                                            body))
    assert status == 400 and answer["error"]["param"] == "stop"
    status, _, answer = call(server.url + "/v1/messages", {**chat(), "stop_sequences": stop}, ANTHROPIC)
    assert status == 400 and "stop_sequences" in answer["error"]["message"]


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_a_seed_mlx_cannot_take_is_a_400_naming_it(server, seed):
    status, _, answer = call(server.url + "/v1/chat/completions", {**chat(), "seed": seed, "temperature": 1})
    assert status == 400 and answer["error"]["param"] == "seed"


def test_logit_bias_and_penalties_are_honoured_over_http(server, pool):
    greedy = pool.chat(HI, max_tokens=1, temperature=0)
    token = pool.engine.runner("tiny-llama").tokenizer.encode(greedy.text)[0]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    banned = client.chat.completions.create(model="tiny", messages=HI, max_tokens=1, temperature=0,
                                            logit_bias={str(token): -100})
    assert banned.choices[0].message.content != greedy.text
    hello = [{"role": "user", "content": "Hello"}]  # the tiny model repeats itself here within 60 tokens
    free = client.chat.completions.create(model="tiny", messages=hello, max_tokens=60, temperature=0)
    penalised = client.chat.completions.create(model="tiny", messages=hello, max_tokens=60, temperature=0,
                                               frequency_penalty=2, presence_penalty=2)
    assert penalised.choices[0].message.content != free.choices[0].message.content
    status, _, answer = call(server.url + "/v1/chat/completions", {**chat(), "logit_bias": {"99999999": 5}})
    assert status == 400 and answer["error"]["param"] == "logit_bias"


def test_a_request_the_pool_refuses_leaves_one_row_with_the_status_answered(server, audit):
    status, headers, _ = call(server.url + "/v1/chat/completions", {**chat(), "temperature": -1})
    assert status == 400
    (row,) = audit.query()
    assert row["id"] == headers["x-request-id"] and row["http_status"] == 400 and row["status"] == "error"


# -- hostile tools and schemas ---------------------------------------------------------------------


def _nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def _tool(i: int, schema: dict) -> dict:
    return {"type": "function", "function": {"name": f"f{i}", "parameters": schema}}


SMALL = {"type": "object", "properties": {"a": {"type": "integer"}}}
HUGE_ENUM = {"type": "object", "properties": {"a": {"enum": [f"value{i}" for i in range(100_000)]}}}
OPENAI_HOSTILE = {
    "deep schema": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _nested(300)}}},
                    "response_format.json_schema.schema"),
    "deep tool": ({"tools": [_tool(0, _nested(300))], "tool_choice": "required"}, "tools[0].function.parameters"),
    "129 tools": ({"tools": [_tool(i, SMALL) for i in range(129)]}, "tools"),
    "100,000-value enum": ({"tools": [_tool(0, HUGE_ENUM)], "tool_choice": "required"},
                           "tools[0].function.parameters"),
}


@pytest.mark.parametrize("extra,param", OPENAI_HOSTILE.values(), ids=OPENAI_HOSTILE.keys())
def test_hostile_tools_and_schemas_are_400s_beside_bystanders(server, pool, extra, param):
    body = json.dumps({**chat(), **extra}).encode()
    status, answer = with_bystanders(server, pool, lambda http: post_raw(http, server.url + "/v1/chat/completions",
                                                                            body))
    assert status == 400 and answer["error"]["param"] == param, answer


ANTHROPIC_HOSTILE = {
    "deep input_schema": ({"tools": [{"name": "f", "input_schema": _nested(300)}], "tool_choice": {"type": "any"}},
                          "tools.0.input_schema nests objects and arrays more than 64 levels"),
    "129 tools": ({"tools": [{"name": f"f{i}", "input_schema": SMALL} for i in range(129)]},
                  "tools holds 129 tools; at most 128"),
    "deep output format": ({"output_config": {"format": {"type": "json_schema", "schema": _nested(300)}}},
                           "output_config.format.schema nests objects and arrays more than 64 levels"),
}


@pytest.mark.parametrize("extra,says", ANTHROPIC_HOSTILE.values(), ids=ANTHROPIC_HOSTILE.keys())
def test_hostile_anthropic_tools_and_formats_are_400s_beside_bystanders(server, pool, extra, says):
    body = json.dumps({**chat(), **extra}).encode()
    status, answer = with_bystanders(server, pool, lambda http: post_raw(http, server.url + "/v1/messages", body,
                                                                            ANTHROPIC))
    assert status == 400 and answer["type"] == "error" and answer["error"]["type"] == "invalid_request_error"
    assert says in answer["error"]["message"], answer


# -- connections: slow, idle, oversized and too many ----------------------------------------------


SLOW_POST = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
             b"content-length: 100000\r\n\r\n")


@pytest.fixture
def guarded(pool):
    """A server with short connection deadlines and a small cap, to attack in seconds."""
    s = serve(pool, port=0, mode="thread", idle_timeout=1.0, body_timeout=1.5, max_connections=12)
    yield s
    s.stop(drain=0)


async def _open(server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def _seconds_until_closed(reader, writer, drip: bytes = b"") -> tuple[float, bytes]:
    """Send ``drip`` a byte every 0.1 s (its last byte forever) until the server closes; (seconds, what it sent)."""
    start, got = time.monotonic(), b""
    while time.monotonic() - start < 20:
        if drip:
            writer.write(drip[:1])
            drip = drip[1:] or drip
        try:
            chunk = await asyncio.wait_for(reader.read(4096), 0.1)
        except asyncio.TimeoutError:
            continue
        except ConnectionError:
            break
        if not chunk:
            break
        got += chunk
    writer.close()
    return time.monotonic() - start, got


def test_slowloris_headers_and_silent_and_idle_connections_are_cut_beside_bystanders(guarded, pool):
    async def attack(http):
        slow = _seconds_until_closed(*await _open(guarded), b"POST /v1/chat/completions HTTP/1.1\r\nx-a: aaaa")
        silent = _seconds_until_closed(*await _open(guarded))
        reader, writer = await _open(guarded)
        writer.write(b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        idle = _seconds_until_closed(reader, writer)  # keep-alive: answered, then says nothing
        return await asyncio.gather(slow, silent, idle)

    (slow, _), (silent, _), (idle, answer) = with_bystanders(guarded, pool, attack)
    assert all(0.9 < t < 3.0 for t in (slow, silent, idle)), (slow, silent, idle)
    assert answer.startswith(b"HTTP/1.1 200")


def test_a_body_sent_byte_by_byte_is_a_408_after_the_body_timeout(guarded, pool):
    async def attack(http):
        reader, writer = await _open(guarded)
        writer.write(SLOW_POST)
        return await _seconds_until_closed(reader, writer, b'{"model": "tiny", "messages": "' + b"x" * 1000)

    seconds, answer = with_bystanders(guarded, pool, attack)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408") and b"application/json" in head
    assert "did not arrive within 1.5 s" in json.loads(body)["error"]["message"]
    assert 1.4 < seconds < 6.0  # the deadline, then at most 2 s draining what it still sends


def test_an_oversized_header_is_a_json_error(server):
    status, body = raw_http(server.port, b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: " + b"a" * 9000 + b"\r\n")
    error = json.loads(body)["error"]
    assert status == 400 and error["code"] == "request_too_large" and "8190" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_past_the_connection_cap_the_oldest_idle_ones_close_and_health_and_streams_go_on(pool):
    s = serve(pool, port=0, mode="thread", max_connections=12)  # idle ones would wait 15 s for their timeout

    async def attack(http):
        half_open = [await _open(s) for _ in range(40)]
        for _, writer in half_open:
            writer.write(b"GET /health HTTP/1.1\r\n")  # headers never finished
        # from a new client, not over a bystander's pooled keep-alive connection (the cap may close that one)
        async with aiohttp.ClientSession() as new_client, new_client.get(s.url + "/health") as r:
            health = r.status
        closed = []
        for reader, _ in half_open:
            try:
                closed.append(await asyncio.wait_for(reader.read(), 0.5) == b"")
            except ConnectionResetError:
                closed.append(True)
            except asyncio.TimeoutError:
                closed.append(False)
        for _, writer in half_open:
            writer.close()
        return health, closed

    try:
        health, closed = with_bystanders(s, pool, attack)
    finally:
        s.stop(drain=0)
    assert health == 200 and all(closed[:28]) and not any(closed[-6:]), closed


def test_past_the_connection_cap_with_every_one_busy_a_new_one_gets_a_json_503(pool):
    s = serve(pool, port=0, mode="thread", max_connections=2)

    async def attack():
        busy = [await _open(s) for _ in range(2)]
        for _, writer in busy:
            writer.write(SLOW_POST + b"{")  # requests in progress, their bodies still coming
        await asyncio.sleep(0.5)
        reader, writer = await _open(s)
        answer = await asyncio.wait_for(reader.read(), 5)
        for _, w in [*busy, (reader, writer)]:
            w.close()
        return answer

    try:
        answer = asyncio.run(attack())
    finally:
        s.stop(drain=0)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in head.lower()
    assert json.loads(body)["error"]["code"] == "overloaded"


def test_a_connection_whose_answer_is_still_being_written_stays_busy_for_the_cap(pool, tmp_path):
    """A non-streamed answer larger than the socket buffers, to a client that has not read it yet, keeps
    its connection busy until written: past the cap a new connection gets the 503, not that one's cut."""
    from tiny_bert import build_tiny_bert

    pool.load(build_tiny_bert(tmp_path / "tiny-bert"), alias="bert")
    s = serve(pool, port=0, mode="thread", max_connections=1)
    body = json.dumps({"model": "bert", "input": ["a b c"] * 2048}).encode()  # a 1.5 MB answer

    def request(last: bool) -> bytes:
        return (b"POST /v1/embeddings HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                b"%scontent-length: %d\r\n\r\n%s" % (b"connection: close\r\n" if last else b"", len(body), body))

    try:
        with socket.socket() as slow:
            slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow.connect(("127.0.0.1", s.port))
            slow.sendall(request(False) * 2 + request(True))  # three answers, not read for now
            time.sleep(3)  # the first answer fills the socket buffers; the second is being written
            status, _ = raw_http(s.port, b"GET /health HTTP/1.1\r\nhost: 127.0.0.1\r\n")
            answers = b""
            while chunk := slow.recv(1 << 20):
                answers += chunk
    finally:
        s.stop(drain=0)
    assert status == 503
    assert answers.count(b"HTTP/1.1 200 OK") == 3 and len(answers) > 3 * len(body)


# -- hostile completions prompts: token ids, batches, echo ----------------------------------------------

HOSTILE_PROMPTS = {
    "negative id": ({"prompt": [-1, 5]}, "prompt"),
    "id 2**63": ({"prompt": [2**63]}, "prompt"),
    "id past the vocabulary, echoed": ({"prompt": [5, 99_999], "echo": True, "logprobs": 1}, "prompt"),
    "float id": ({"prompt": [1.0, 5]}, "prompt"),
    "boolean id": ({"prompt": [True, 5]}, "prompt"),
    "ids and strings": ({"prompt": [5, "a"]}, "prompt"),
    "nested lists": ({"prompt": [[[5]]]}, "prompt"),
    "an empty list in a batch": ({"prompt": [[5], []]}, "prompt"),
    "100,000 prompts": ({"prompt": ["a"] * 100_000}, "prompt"),
    "a bad id in a batch, echoed": ({"prompt": [[5], [2**63]], "echo": True, "max_tokens": 0}, "prompt[1]"),
    "a bad id last in a batch": ({"prompt": [[5, 6]] * 40 + [[-1]], "max_tokens": 50}, "prompt[40]"),
    "a prompt over the context last in a batch": ({"prompt": ["Hi"] * 40 + ["Hi " * 600]}, "prompt[40]"),
    "logprobs 10**30": ({"prompt": "Hi", "echo": True, "logprobs": 10**30}, "logprobs"),
    "logprobs -1": ({"prompt": "Hi", "echo": True, "logprobs": -1}, "logprobs"),
    "echo a string": ({"prompt": "Hi", "echo": "true"}, "echo"),
    "max_tokens 0 without echo": ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    "1 MB of ids echoed": ({"prompt": [5] * 250_000, "echo": True, "max_tokens": 0}, "prompt"),
    "128 prompts of 500 ids echoed with 20 alternatives": (  # 1.3 million log-probabilities: 29 s, 650 MB
        {"prompt": [[5] * 500] * 128, "echo": True, "logprobs": 20, "max_tokens": 0}, "prompt"),
}


@pytest.mark.parametrize("extra,param", HOSTILE_PROMPTS.values(), ids=HOSTILE_PROMPTS.keys())
def test_hostile_completions_prompts_are_400s_beside_bystanders_each_with_its_row(server, pool, audit, extra,
                                                                                   param):
    body = json.dumps({"model": "tiny", "max_tokens": 2, **extra}).encode()
    status, answer = with_bystanders(server, pool, lambda http: post_raw(http, server.url + "/v1/completions", body))
    assert status == 400 and answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    refused = [r for r in audit.query() if r["endpoint"] == "/v1/completions"]
    assert [r["status"] for r in refused] == ["error"], refused
    assert call(server.url + "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 2})[0] == 200
