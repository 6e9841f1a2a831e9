"""The /v1 server with the official openai and anthropic SDKs and raw HTTP, on the tiny model."""

import asyncio
import json
import shutil
import socket
import threading
import urllib.request
from typing import get_args

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web
from anthropic.types import ModelInfo
from anthropic.types.shared import ErrorResponse, ErrorType
from helpers import wait_for

from mlx_manager_nb import store
from mlx_manager_nb.errors import ServerError
from mlx_manager_nb.server import create_app, serve
from mlx_manager_nb.server.anthropic_api import KINDS as ANTHROPIC_KINDS

HI = [{"role": "user", "content": "Hi"}]
GREEDY = {"temperature": 0}  # the anthropic SDK takes sampling settings through extra_body


def post(url, body, headers=None, raw=None):
    """A raw HTTP POST with the standard library, returning (status, headers, parsed body)."""
    import urllib.error
    import urllib.request

    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


# -- the official SDKs ------------------------------------------------------------------------


def test_openai_chat_non_streamed(server, pool):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, temperature=0)
    expected = pool.chat(HI, max_tokens=6, temperature=0).text
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0


def test_openai_chat_streamed_with_usage(server, pool):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    chunks = list(client.chat.completions.create(model="tiny", messages=HI, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == pool.chat(HI, max_tokens=6, temperature=0).text
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_openai_stop_strings_and_max_completion_tokens(server, pool):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    full = pool.chat(HI, max_tokens=12, temperature=0).text
    stop = full[3:5]
    r = client.chat.completions.create(model="tiny", messages=HI, max_completion_tokens=12, temperature=0,
                                       stop=stop)
    assert r.choices[0].message.content == full[:full.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_openai_async_client_and_completions(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused")
        r = await client.completions.create(model="tiny", prompt="Once upon", max_tokens=4, temperature=0)
        stream = await client.completions.create(model="tiny", prompt="Once upon", max_tokens=4, temperature=0,
                                                 stream=True)
        streamed = "".join([c.choices[0].text async for c in stream])
        await client.close()
        return r, streamed

    r, streamed = asyncio.run(main())
    assert r.object == "text_completion" and r.usage.completion_tokens == 4
    assert streamed == r.choices[0].text


def test_models_lists_loaded_and_loadable(server, tiny_model_path):
    shutil.copytree(tiny_model_path, store.models_dir() / "on-disk")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    models = {m.id: m for m in client.models.list().data}
    assert models["tiny"].model_extra["state"] == "ready"
    assert models["on-disk"].model_extra["state"] == "available"


def test_every_error_kind_is_a_type_of_the_anthropic_sdk():
    assert set(ANTHROPIC_KINDS.values()) <= set(get_args(ErrorType))


def test_anthropic_model_info_has_the_fields_the_sdk_requires(server):
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    listed = client.models.with_raw_response.list().http_response.json()["data"]
    infos = [ModelInfo.model_validate(m) for m in listed]  # strict: every required field, valid values
    assert "tiny" in {m.id for m in infos} and {m.lifecycle for m in infos} == {"active"}
    assert ModelInfo.model_validate(client.models.with_raw_response.retrieve("tiny").http_response.json()).id == "tiny"


@pytest.mark.parametrize("field, value", [
    ("web_search_options", {}),  # an empty object turns web search on: there is none
    ("web_search_options", {"search_context_size": "low"}),
    ("verbosity", "low"),
    ("reasoning_effort", "high"),
])
def test_chat_fields_that_cannot_be_honoured_are_refused(server, field, value):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=2, extra_body={field: value})
    assert caught.value.body["param"] == field


def test_chat_no_op_values_are_accepted(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=2, verbosity="medium",
                                       reasoning_effort="none")
    assert r.usage.completion_tokens == 2


def test_anthropic_create_stream_and_count(server, pool):
    client = anthropic.Anthropic(base_url=server.url, api_key="unused")
    expected = pool.chat(HI, max_tokens=6, temperature=0).text
    m = client.messages.create(model="tiny", max_tokens=6, messages=HI, extra_body={"temperature": 0})
    assert m.content[0].text == expected and m.stop_reason == "max_tokens"
    assert m.usage.output_tokens == 6
    with client.messages.stream(model="tiny", max_tokens=6, messages=HI, extra_body={"temperature": 0}) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == expected and final.usage.output_tokens == 6
    assert final.usage.input_tokens == m.usage.input_tokens > 0  # message_start carries the prompt's length
    stream = client.messages.create(model="tiny", max_tokens=3, messages=HI, stream=True, extra_body=GREEDY)
    events = [e.type for e in stream]
    assert events[:2] == ["message_start", "content_block_start"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    count = client.messages.count_tokens(model="tiny", messages=HI, system="Be brief.")
    assert count.input_tokens == pool.count_tokens([{"role": "system", "content": "Be brief."}, *HI], "tiny")


def test_anthropic_stream_sends_the_full_event_sequence(server):
    async def main():
        async with aiohttp.ClientSession() as session:
            body = {"model": "tiny", "max_tokens": 3, "stream": True, "messages": HI, "temperature": 0}
            async with session.post(server.url + "/v1/messages", json=body) as r:
                return [line.decode()[7:].strip() async for line in r.content if line.startswith(b"event: ")]

    events = asyncio.run(main())
    assert events == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * (len(events) - 6) + [
        "content_block_stop", "message_delta", "message_stop"]
    assert len(events) > 6


def test_anthropic_system_blocks_and_stop_sequences(server, pool):
    client = anthropic.Anthropic(base_url=server.url, api_key="unused")
    system = [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    full = pool.chat([{"role": "system", "content": "Be brief."}, *HI], max_tokens=12, temperature=0).text
    stop = full[4:6]
    m = client.messages.create(model="tiny", max_tokens=12, system=system, messages=messages,
                               stop_sequences=[stop], extra_body={"temperature": 0})
    assert m.content[0].text == full[:full.find(stop)]
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop


def test_sdks_against_a_server_on_a_running_loop(pool):
    """mode='kernel': the server shares the caller's loop, as it does inside Jupyter."""

    async def main():
        s = serve(pool, port=0)
        assert s.mode == "kernel"
        client = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="unused")
        r = await client.chat.completions.create(model="tiny", messages=HI, temperature=0, max_tokens=4)
        aclient = anthropic.AsyncAnthropic(base_url=s.url, api_key="unused")
        async with aclient.messages.stream(model="tiny", max_tokens=4, messages=HI, extra_body=GREEDY) as stream:
            final = await stream.get_final_message()
        await client.close()
        await aclient.close()
        await s.astop(drain=0)
        return r, final

    r, final = asyncio.run(main())
    assert r.usage.completion_tokens == 4 and final.usage.output_tokens == 4


# -- bad input, in each protocol's shape --------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "tiny", "messages": "hi"}, 400, "messages"),
        ({"model": "tiny"}, 400, "messages"),
        ({"messages": HI}, 400, "model"),
        ({"model": "tiny", "messages": HI, "temperature": "hot"}, 400, "temperature"),
        ({"model": "tiny", "messages": HI, "n": 2}, 400, "n"),
        ({"model": "tiny", "messages": HI, "tools": [{"type": "function"}]}, 400, "tools[0].function"),
        ({"model": "tiny", "messages": HI, "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"model": "tiny", "messages": HI, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "nonsense"}}}}, 400, "response_format.json_schema.schema"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages[0].content[0]"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
        ({"model": "nope", "messages": HI}, 404, "model"),
    ],
)
def test_openai_bad_requests(server, body, status, param):
    code, _, err = post(server.url + "/v1/chat/completions", body)
    assert code == status
    assert set(err["error"]) == {"message", "type", "param", "code"} and err["error"]["param"] == param
    assert post(server.url + "/v1/chat/completions", {"model": "tiny", "messages": HI, "max_tokens": 2})[0] == 200


def test_out_of_range_values_name_the_field(server):
    code, _, err = post(server.url + "/v1/chat/completions", {"model": "tiny", "messages": HI, "top_p": 1.5})
    assert code == 400 and "top_p" in err["error"]["message"]
    code, _, err = post(server.url + "/v1/chat/completions", {"model": "tiny", "messages": HI, "max_tokens": 10**6})
    assert code == 400 and "max_tokens" in err["error"]["message"]


def test_malformed_json_and_oversized_bodies(pool):
    s = serve(pool, port=0, mode="thread", max_body=1000)
    try:
        code, _, err = post(s.url + "/v1/chat/completions", None, raw=b"{not json")
        assert code == 400 and "JSON" in err["error"]["message"]
        big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}
        code, _, err = post(s.url + "/v1/messages", big)
        assert code == 413 and err == {"type": "error", "error": {"type": "invalid_request_error",
                                                                  "message": err["error"]["message"]}}
        ErrorResponse.model_validate(err)  # a type in the SDK's union of errors
        with pytest.raises(anthropic.ContentTooLargeError):
            anthropic.Anthropic(base_url=s.url, api_key="unused", max_retries=0).messages.create(
                model="tiny", max_tokens=5, messages=big["messages"])
        code, _, err = post(s.url + "/v1/chat/completions", big)  # OpenAI's shape on OpenAI's side
        assert code == 413 and err["error"]["type"] == "invalid_request_error"
        assert err["error"]["code"] == "request_too_large"
    finally:
        s.stop(drain=0)


@pytest.mark.parametrize(
    "body, status, kind",
    [
        ({"model": "tiny", "messages": HI}, 400, "invalid_request_error"),  # max_tokens is required
        ({"model": "tiny", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400,
         "invalid_request_error"),
        ({"model": "tiny", "max_tokens": 5, "messages": HI, "temperature": 1.5}, 400, "invalid_request_error"),
        ({"model": "nope", "max_tokens": 5, "messages": HI}, 404, "not_found_error"),
    ],
)
def test_anthropic_bad_requests(server, body, status, kind):
    code, _, err = post(server.url + "/v1/messages", body)
    assert code == status and err["type"] == "error" and err["error"]["type"] == kind


def test_api_key_in_both_protocols(pool):
    s = serve(pool, port=0, mode="thread", api_key="sekret")
    try:
        code, _, err = post(s.url + "/v1/chat/completions", {"model": "tiny", "messages": HI})
        assert code == 401 and err["error"]["code"] == "invalid_api_key"
        code, _, err = post(s.url + "/v1/messages", {"model": "tiny", "max_tokens": 2, "messages": HI},
                            {"x-api-key": "wrong"})
        assert code == 401 and err["error"]["type"] == "authentication_error"
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret")
        r = ok.chat.completions.create(model="tiny", messages=HI, temperature=0, max_tokens=2)
        assert r.usage.completion_tokens == 2
        ok = anthropic.Anthropic(base_url=s.url, api_key="sekret")
        assert ok.messages.create(model="tiny", max_tokens=2, messages=HI, extra_body=GREEDY).usage.output_tokens == 2
    finally:
        s.stop(drain=0)


def test_request_id_is_echoed_and_used_in_the_audit_log(server, audit):
    code, headers, _ = post(server.url + "/v1/chat/completions", {"model": "tiny", "messages": HI, "max_tokens": 2},
                            {"x-request-id": "my-id-1"})
    assert code == 200 and headers["x-request-id"] == "my-id-1"
    code, headers, _ = post(server.url + "/v1/chat/completions", {"model": "tiny", "messages": "x"})
    generated = headers["x-request-id"]
    (mine,) = audit.query(client_request_id="my-id-1")
    assert mine["id"].startswith("req_") and mine["id"] != "my-id-1"  # the key is always ours
    assert mine["status"] == "ok" and mine["source"] == "http"
    assert mine["protocol"] == "openai" and mine["http_status"] == 200
    rows = {r["id"]: r for r in audit.query()}
    assert rows[generated]["status"] == "error" and rows[generated]["http_status"] == 400


def test_unknown_local_model_is_loaded_on_first_use(server, pool, tiny_model_path):
    shutil.copytree(tiny_model_path, store.models_dir() / "lazy")
    code, _, _body = post(server.url + "/v1/chat/completions", {"model": "lazy", "messages": HI, "max_tokens": 2})
    assert code == 200 and pool.is_loaded("lazy")


def test_auto_load_can_be_switched_off_and_aliases_map_names(pool, tiny_model_path):
    shutil.copytree(tiny_model_path, store.models_dir() / "lazy")
    s = serve(pool, port=0, mode="thread", auto_load=False, aliases={"gpt-4o-mini": "tiny", "later": "lazy"})
    try:
        assert post(s.url + "/v1/chat/completions", {"model": "lazy", "messages": HI})[0] == 404
        assert post(s.url + "/v1/chat/completions", {"model": "later", "messages": HI})[0] == 404
        listed = {m["id"] for m in json.load(urllib.request.urlopen(s.url + "/v1/models", timeout=10))["data"]}
        assert "gpt-4o-mini" in listed and not {"lazy", "later"} & listed  # what is listed can be used
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused")
        r = client.chat.completions.create(model="gpt-4o-mini", messages=HI, temperature=0, max_tokens=2)
        assert r.model == "gpt-4o-mini" and r.usage.completion_tokens == 2
    finally:
        s.stop(drain=0)


def test_the_listed_demo_alias_answers_for_a_demo_model_loaded_by_path(make_pool, tiny_model_path, tmp_path):
    from mlx_manager_nb.demo import DEMO_NAME

    shutil.copytree(tiny_model_path, tmp_path / DEMO_NAME)  # stands in for the demo model's folder
    p = make_pool(keep_alive=None)
    p.load(tmp_path / DEMO_NAME)
    s = serve(p, port=0, mode="thread", auto_load=False)
    try:
        listed = {m["id"] for m in json.load(urllib.request.urlopen(s.url + "/v1/models", timeout=10))["data"]}
        assert "demo" in listed
        assert post(s.url + "/v1/chat/completions", {"model": "demo", "messages": HI, "max_tokens": 2})[0] == 200
    finally:
        s.stop(drain=0)


def test_pool_full_is_503_or_529_with_a_retry_hint(make_pool, tiny_model_path, audit):
    p = make_pool(max_models=1, keep_alive=None, audit=audit)
    p.load(tiny_model_path, pin=True)
    shutil.copytree(tiny_model_path, store.models_dir() / "other")
    s = serve(p, port=0, mode="thread")
    try:
        code, headers, err = post(s.url + "/v1/chat/completions", {"model": "other", "messages": HI})
        assert code == 503 and headers["retry-after"] and "Pool full" in err["error"]["message"]
        code, _, err = post(s.url + "/v1/messages", {"model": "other", "max_tokens": 2, "messages": HI})
        assert code == 529 and err["error"]["type"] == "overloaded_error"
    finally:
        s.stop(drain=0)


# -- streams: disconnects, failures, draining ------------------------------------------------------


def test_a_client_disconnect_mid_stream_frees_the_engine_slot(server, pool, audit):
    async def main():
        async with aiohttp.ClientSession() as session:
            body = {"model": "tiny", "messages": HI, "max_tokens": 400, "stream": True, "temperature": 0}
            async with session.post(server.url + "/v1/chat/completions", json=body) as r:
                await r.content.readline()
                await r.content.readline()
                assert pool.models()[0].in_flight == 1
            # leaving the block closes the connection mid-stream

    asyncio.run(main())
    assert wait_for(lambda: pool.models()[0].in_flight == 0)
    assert not pool.engine.runner("tiny-llama").active
    audit.flush()
    assert wait_for(lambda: [r["status"] for r in audit.query()] == ["cancelled"])


def test_a_failure_mid_stream_is_an_sse_error_and_the_server_goes_on(server, pool):
    inner = pool.engine.runner("tiny-llama").model.model
    norm = inner.norm
    events = []

    async def main():
        async with aiohttp.ClientSession() as session:
            body = {"model": "tiny", "max_tokens": 300, "stream": True, "messages": HI, "temperature": 0}
            async with session.post(server.url + "/v1/messages", json=body) as r:
                async for line in r.content:
                    events.append(line.decode())
                    if "content_block_delta" in events[-1] and "norm" not in vars(inner):

                        def broken(*a, **k):
                            raise RuntimeError("boom")

                        inner.norm = broken

    asyncio.run(main())
    del vars(inner)["norm"]
    inner.norm = norm
    assert "event: error\n" in events and any("boom" in e for e in events)
    client = anthropic.Anthropic(base_url=server.url, api_key="unused")
    assert client.messages.create(model="tiny", max_tokens=2, messages=HI, extra_body=GREEDY).usage.output_tokens == 2


def test_stop_drains_open_streams(pool):
    s = serve(pool, port=0, mode="thread")
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused")
    stream = client.chat.completions.create(model="tiny", messages=HI, temperature=0, max_tokens=60, stream=True,
                                            stream_options={"include_usage": True})
    first = next(iter(stream))
    stopper = threading.Thread(target=s.stop, kwargs={"drain": 60})
    stopper.start()
    rest = list(stream)
    stopper.join()
    assert first.choices[0].delta.role == "assistant"
    assert rest[-1].usage.completion_tokens == 60
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0).models.list()


def test_a_stop_that_cuts_answers_ends_each_as_its_protocol_ends_an_interrupted_one(pool, audit):
    s = serve(pool, port=0, mode="thread")
    oai = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    claude = anthropic.Anthropic(base_url=s.url, api_key="unused", max_retries=0)
    long = {"max_tokens": 480, "temperature": 0}
    streams = [oai.chat.completions.create(model="tiny", messages=HI, stream=True, **long),
               claude.messages.create(model="tiny", messages=HI, stream=True, max_tokens=480, extra_body=GREEDY),
               oai.responses.create(model="tiny", input="Hi", stream=True, max_output_tokens=480, temperature=0)]
    firsts = [next(iter(stream)) for stream in streams]
    outcomes: list = []

    def plain(call):
        try:
            outcomes.append(call())
        except Exception as e:
            outcomes.append(e)

    calls = [lambda: oai.chat.completions.create(model="tiny", messages=HI, **long),
             lambda: claude.messages.create(model="tiny", messages=HI, max_tokens=480, extra_body=GREEDY)]
    threads = [threading.Thread(target=plain, args=(call,)) for call in calls]
    for t in threads:
        t.start()
    assert wait_for(lambda: pool.models()[0].in_flight == 5)
    s.stop(drain=0.2)
    for t in threads:
        t.join()
    assert firsts[0].choices[0].delta.role == "assistant"
    with pytest.raises(openai.APIError, match="server stopped"):  # an error chunk: no finish_reason, no [DONE]
        list(streams[0])
    with pytest.raises(anthropic.APIStatusError, match="server stopped"):  # event: error
        list(streams[1])
    events = list(streams[2])
    assert events[-1].type == "response.failed" and "server stopped" in events[-1].response.error.message
    assert {type(o) for o in outcomes} == {openai.InternalServerError, anthropic.ServiceUnavailableError}
    assert {(o.status_code, o.response.headers["retry-after"]) for o in outcomes} == {(503, "5")}
    assert [o.body["error"]["type"] for o in outcomes if isinstance(o, anthropic.APIError)] == ["api_error"]
    rows = audit.query()
    assert [r["status"] for r in rows] == ["cancelled"] * 5
    assert all("server stopped" in r["error_message"] for r in rows)
    assert sorted(r["http_status"] for r in rows) == [200, 200, 200, 503, 503]


def server_threads() -> set[threading.Thread]:
    """The threads a thread-mode server owns: its loop, its executor's workers, its Responses store."""
    return {t for t in threading.enumerate() if t.name.startswith(("mlx-nb-server", "mlx-nb-responses"))}


def test_start_stop_cycles_leak_no_port_or_thread(pool):
    s = serve(pool, port=0, mode="thread")
    port = s.port
    s.stop(drain=0)
    for _ in range(5):
        before = server_threads()  # other tests' servers may be running: only this one's threads count
        s = serve(pool, port=port, mode="thread")
        assert post(s.url + "/v1/chat/completions", {"model": "tiny", "messages": HI, "max_tokens": 1})[0] == 200
        owned = server_threads() - before
        assert any(t.name == "mlx-nb-server" for t in owned)
        s.stop(drain=0)
        assert wait_for(lambda owned=owned: not any(t.is_alive() for t in owned)), owned
    with socket.socket() as probe:  # nobody listens there any more (TIME_WAIT needs SO_REUSEADDR)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
        probe.listen()


def test_a_running_loop_server_leaves_no_task_behind(pool):
    async def main():
        before = len(asyncio.all_tasks())
        for _ in range(3):
            s = serve(pool, port=0)
            await asyncio.sleep(0)
            await s.astop(drain=0)
        return before, len(asyncio.all_tasks())

    before, after = asyncio.run(main())
    assert after == before


def test_busy_port_and_unsafe_bind_are_refused(pool, server):
    with pytest.raises(ServerError, match=f"Port {server.port} .* in use"):
        serve(pool, port=server.port, mode="thread")
    with pytest.raises(ServerError, match="without an api_key"):
        serve(pool, host="0.0.0.0", port=0, mode="thread")


def test_cors_is_off_by_default_and_follows_the_allow_list(pool, server):
    async def fetch(url, origin, method="GET"):
        async with aiohttp.ClientSession() as session:
            headers = {"Origin": origin}
            if method == "OPTIONS":
                headers["Access-Control-Request-Method"] = "POST"
            async with session.request(method, url, headers=headers) as r:
                return r.status, r.headers.get("access-control-allow-origin")

    assert asyncio.run(fetch(server.url + "/v1/models", "http://app.example"))[1] is None
    s = serve(pool, port=0, mode="thread", cors_origins=["http://app.example"])
    try:
        assert asyncio.run(fetch(s.url + "/v1/models", "http://app.example")) == (200, "http://app.example")
        assert asyncio.run(fetch(s.url + "/v1/chat/completions", "http://app.example", "OPTIONS")) == (
            204, "http://app.example")
        assert asyncio.run(fetch(s.url + "/v1/models", "http://evil.example"))[1] is None
    finally:
        s.stop(drain=0)


def test_health(server):
    import urllib.request

    def health():
        with urllib.request.urlopen(server.url + "/health") as r:
            return json.loads(r.read())

    before = health()
    assert before["status"] == "ok" and before["models"] == ["tiny"]
    assert post(server.url + "/v1/chat/completions", {"model": "tiny", "messages": HI, "max_tokens": 1})[0] == 200
    after = health()["server"]
    assert after["requests"] == before["server"]["requests"] + 1 and after["in_flight"] == 0


def test_the_app_mounts_inside_a_parent_app(pool):
    async def hello(request):
        return web.json_response({"parent": True})

    async def main():
        parent = web.Application()
        parent.router.add_get("/hello", hello)
        parent.add_subapp("/v1", create_app(pool=pool))
        runner = web.AppRunner(parent)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/hello") as r:
                parent_answer = await r.json()
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
            r = await client.chat.completions.create(model="tiny", messages=HI, temperature=0, max_tokens=2)
            await client.close()
        await runner.cleanup()
        return parent_answer, r

    parent_answer, r = asyncio.run(main())
    assert parent_answer == {"parent": True} and r.usage.completion_tokens == 2
    assert pool.is_loaded("tiny")  # the app's cleanup unloaded nothing


def test_500_concurrent_requests_leave_500_audit_rows(pool, audit):
    s = serve(pool, port=0, mode="thread", max_client_requests=50)  # one client, 50 at once: a load test

    async def main():
        limit = asyncio.Semaphore(50)
        async with aiohttp.ClientSession() as session:

            async def one(i):
                async with limit:
                    if i % 2:
                        body = {"model": "tiny", "max_tokens": 1, "messages": HI}
                        url = "/v1/messages"
                    else:
                        body = {"model": "tiny", "max_tokens": 1, "messages": HI, "stream": i % 4 == 0}
                        url = "/v1/chat/completions"
                    async with session.post(s.url + url, json=body) as r:
                        await r.read()
                        return r.status

            return await asyncio.gather(*(one(i) for i in range(500)))

    statuses = asyncio.run(main())
    s.stop(drain=1)  # stopping flushes the audit log
    assert statuses == [200] * 500
    assert audit.pending == 0
    rows = audit.query(limit=None)
    assert len(rows) == 500 and {r["status"] for r in rows} == {"ok"}
    assert sum(r["protocol"] == "anthropic" for r in rows) == 250
