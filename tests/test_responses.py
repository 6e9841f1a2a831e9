"""The Responses API (/v1/responses) with the official openai SDK, openai-agents and raw HTTP.

Every response and every streamed event is validated against the SDK's own types, strictly: a
field the types do not know fails the test as a missing one does.
"""

import asyncio
import dataclasses
import itertools
import json
import sqlite3
import time
import urllib.request
from types import SimpleNamespace
from typing import Literal

import openai
import pytest
from helpers import call
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter

from mlx_manager_nb.response_store import MIGRATIONS, ResponseStore
from mlx_manager_nb.server import serve
from mlx_manager_nb.server.responses_api import _input_items, _messages, _structure
from mlx_manager_nb.server.responses_output import Draft, final, stream_shape
from mlx_manager_nb.streams import Result, Usage
from mlx_manager_nb.tools import CallPiece, Tool

EVENT = TypeAdapter(ResponseStreamEvent)
GREEDY = {"temperature": 0, "max_output_tokens": 6}
HI = [{"role": "user", "content": "Hi"}]


def strict(model: BaseModel, where: str = "") -> None:
    """Fail on any field the SDK's types do not declare, at any depth."""
    assert not model.model_extra, f"{where or type(model).__name__}: unknown fields {sorted(model.model_extra)}"
    for name, value in model:
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(v, BaseModel):
                strict(v, f"{where}.{name}[{i}]")


def validated(body: dict) -> Response:
    response = Response.model_validate(body)
    strict(response)
    return response


def sse(url: str, body: dict) -> list[tuple[str, dict]]:
    """The (event name, data) pairs of a streamed answer, read raw."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        assert r.headers["content-type"] == "text/event-stream"
        blocks = r.read().decode().strip().split("\n\n")
    out = []
    for block in blocks:
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def checked_events(events: list[tuple[str, dict]]) -> list[str]:
    """Validate each event against the SDK's stream event union; their types, in order."""
    for i, (name, data) in enumerate(events):
        assert name == data["type"] and data["sequence_number"] == i
        event = EVENT.validate_python(data)
        strict(event)
    return [name for name, _ in events]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")



@pytest.fixture
def completes(pool, monkeypatch):
    """Answers to "Hi" end at a stop string, so they complete (the random model never stops by itself);
    returns the text they complete with."""
    full = pool.chat(HI, temperature=0, max_tokens=12).text
    stop = full[4:6]
    astream = pool.astream  # what the server runs a parsed request with
    monkeypatch.setattr(pool, "astream", lambda request, *a: astream(
        dataclasses.replace(request, params=dataclasses.replace(request.params, stop=(stop,))), *a))
    return full[:full.find(stop)]


# -- the official SDK -------------------------------------------------------------------------------


def test_create_answers_as_pool_chat_does(server, pool):
    r = client(server).responses.create(model="tiny", input="Hi", instructions="Be brief.", **GREEDY)
    expected = pool.chat([{"role": "system", "content": "Be brief."}, *HI], temperature=0, max_tokens=6)
    assert r.output_text == expected.text
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].type == "message" and r.output[0].status == "incomplete"
    assert r.usage.output_tokens == 6 and r.usage.input_tokens == expected.usage.prompt_tokens
    assert r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.instructions == "Be brief." and r.max_output_tokens == 6 and r.temperature == 0
    code, _, body = call(server.url + "/v1/responses", {"model": "tiny", "input": HI, **GREEDY})
    assert code == 200 and validated(body).output_text == pool.chat(HI, temperature=0, max_tokens=6).text


def test_stream_helper_and_final_response(server, completes):
    c = client(server)
    with c.responses.stream(model="tiny", input="Hi", temperature=0) as stream:
        types = [event.type for event in stream]
        streamed = stream.get_final_response()
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert streamed.status == "completed" and streamed.output_text == completes
    strict(streamed)
    created = c.responses.create(model="tiny", input="Hi", temperature=0)
    assert created.status == "completed" and created.incomplete_details is None
    assert created.output_text == completes and created.output[0].status == "completed"
    stored = c.responses.retrieve(streamed.id)
    assert (stored.output_text, stored.usage, stored.status) == (streamed.output_text, streamed.usage, "completed")


def test_every_raw_event_is_a_valid_sdk_event_and_the_last_is_stored(server):
    events = sse(server.url + "/v1/responses", {"model": "tiny", "input": "Hi", "stream": True, **GREEDY})
    types = checked_events(events)
    deltas = types.count("response.output_text.delta")
    assert deltas >= 1 and types == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * deltas, "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.incomplete"]
    last = events[-1][1]["response"]
    response = validated(last)
    assert response.output_text == "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert response.output[0].id == events[2][1]["item"]["id"] == events[4][1]["item_id"]
    assert response.usage.output_tokens == 6 and response.status == "incomplete"
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["usage"] is None
    assert call(f"{server.url}/v1/responses/{response.id}", method="GET")[2] == last


def test_previous_response_id_over_three_turns_reuses_the_prompt_cache(server, pool):
    c = client(server)
    ids, conversation, responses = [None], [{"role": "system", "content": "Be brief."}], []
    for question in ["Hi", "Tell me more", "And then?"]:
        r = c.responses.create(model="tiny", input=question, previous_response_id=ids[-1], instructions="Be brief.",
                               **GREEDY)
        conversation.append({"role": "user", "content": question})
        expected = pool.chat(conversation, temperature=0, max_tokens=6)  # what the server should have run
        assert r.output_text == expected.text and r.usage.input_tokens == expected.usage.prompt_tokens
        assert r.previous_response_id == ids[-1]
        conversation.append({"role": "assistant", "content": r.output_text})
        ids.append(r.id)
        responses.append(r)
    assert responses[0].usage.input_tokens_details.cached_tokens == 0
    # a stored conversation renders to the same prompt prefix, so the engine's prompt cache serves it
    for before, after in itertools.pairwise(responses):
        assert after.usage.input_tokens_details.cached_tokens >= before.usage.input_tokens
    items = c.responses.input_items.list(ids[-1], order="asc").data
    assert [(i.role, i.content[0].text) for i in items] == [
        ("user", "Hi"), ("assistant", responses[0].output_text), ("user", "Tell me more"),
        ("assistant", responses[1].output_text), ("user", "And then?")]
    newest = c.responses.input_items.list(ids[-1], limit=2)
    assert [i.id for i in newest.data] == [items[-1].id, items[-2].id] and newest.has_more
    page = c.responses.input_items.list(ids[-1], order="asc", after=items[1].id, limit=2)
    assert [i.id for i in page.data] == [items[2].id, items[3].id]


def test_retrieve_delete_and_unknown_ids(server):
    c = client(server)
    r = c.responses.create(model="tiny", input="Hi", metadata={"topic": "greeting"}, user="me", **GREEDY)
    got = c.responses.retrieve(r.id)
    assert got == r and got.metadata == {"topic": "greeting"} and got.user == "me"
    c.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        c.responses.retrieve(r.id)
    assert e.value.body["param"] is None and "not found" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        c.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.input_items.list(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        c.responses.create(model="tiny", input="Hi", previous_response_id=r.id, **GREEDY)
    assert e.value.body["param"] == "previous_response_id" and e.value.body["code"] == "previous_response_not_found"
    code, _, body = call(f"{server.url}/v1/responses/{r.id}", method="DELETE")
    assert code == 404 and set(body["error"]) == {"message", "type", "param", "code"}


def test_store_false_keeps_nothing(server):
    c = client(server)
    r = c.responses.create(model="tiny", input="Hi", store=False, **GREEDY)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)


def test_a_server_can_store_no_responses(pool, isolated_home):
    s = serve(pool, port=0, mode="thread", store_responses=False)
    try:
        c = client(s)
        r = c.responses.create(model="tiny", input="Hi", **GREEDY)
        with pytest.raises(openai.NotFoundError):
            c.responses.retrieve(r.id)
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model="tiny", input="Hi", previous_response_id=r.id, **GREEDY)
        assert e.value.body["param"] == "previous_response_id" and "store_responses=False" in e.value.body["message"]
    finally:
        s.stop(drain=0)
    assert not (isolated_home / "responses.db").exists()


def test_stored_responses_are_private_and_outlive_the_server(pool, isolated_home):
    s = serve(pool, port=0, mode="thread")
    r = client(s).responses.create(model="tiny", input="Hi", **GREEDY)
    s.stop(drain=0)
    assert (isolated_home / "responses.db").stat().st_mode & 0o777 == 0o600
    s = serve(pool, port=0, mode="thread")
    try:
        assert client(s).responses.retrieve(r.id) == r
    finally:
        s.stop(drain=0)


def test_the_store_is_versioned_and_shared_by_two_writers(tmp_path):
    async def main():
        one, two = ResponseStore(tmp_path / "r.db"), ResponseStore(tmp_path / "r.db")
        one.put({"id": "resp_1", "created_at": time.time(), "model": "m", "status": "completed", "output": []},
                [{"id": "a"}])
        assert (await one.get("resp_1")).context == [{"id": "a"}]  # read after write, in order
        assert (await two.get("resp_1")).response["status"] == "completed"
        assert await two.delete("resp_1") and not await one.delete("resp_1") and await one.get("resp_1") is None
        one.close()
        two.close()

    asyncio.run(main())
    with sqlite3.connect(tmp_path / "r.db") as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM _responses_migrations")]
    assert names == [m.__name__ for m in MIGRATIONS]


def test_responses_older_than_the_retention_are_deleted(tmp_path):
    def response(rid, days_ago):
        return {"id": rid, "created_at": time.time() - days_ago * 86400, "model": "m", "status": "completed"}

    async def main():
        keep_all = ResponseStore(tmp_path / "r.db", max_age_days=None)
        for rid, days in (("resp_old", 31), ("resp_new", 29)):
            keep_all.put(response(rid, days), [])
        assert await keep_all.get("resp_old") is not None
        keep_all.close()
        store = ResponseStore(tmp_path / "r.db")  # 30 days, as OpenAI keeps them: pruned on opening
        found = [await store.get(rid) for rid in ("resp_old", "resp_new")]
        store.put(response("resp_late", 31), [])  # already expired when the store has just pruned
        found.append(await store.get("resp_late"))
        store.close()
        return found

    old, new, late = asyncio.run(main())
    assert old is None and new is not None and late is None


def test_past_the_caps_the_oldest_responses_are_dropped_and_the_file_stops_growing(tmp_path):
    def response(i):
        return {"id": f"resp_{i}", "created_at": time.time() + i, "model": "m", "status": "completed"}

    def size(path):
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]

    async def main():
        counted = ResponseStore(tmp_path / "count.db", max_count=5)
        for i in range(12):
            counted.put(response(i), [])
        kept = [i for i in range(12) if await counted.get(f"resp_{i}") is not None]
        counted.close()
        sized = ResponseStore(tmp_path / "size.db", max_bytes=100_000, max_count=None)
        text = [{"type": "message", "content": "x" * 10_000}]  # ~10 KB a response
        grown = []
        for i in range(300):
            sized.put(response(i), text)
            if i in (99, 299):
                await sized.get("resp_0")  # waits for the queued writes
                grown.append(size(tmp_path / "size.db"))
        sized_kept = [i for i in range(300) if await sized.get(f"resp_{i}") is not None]
        huge = {"id": "resp_huge", "created_at": time.time() + 1000, "model": "m", "status": "completed"}
        sized.put(huge, [{"content": "y" * 200_000}])  # alone over the cap: kept, as the newest
        assert (await sized.get("resp_huge")) is not None and await sized.get("resp_299") is None
        sized.close()
        return kept, grown, sized_kept

    kept, (after_100, after_300), sized_kept = asyncio.run(main())
    assert kept == list(range(7, 12))
    assert sized_kept == list(range(291, 300))  # 9 of ~10.1 KB under 100,000 bytes
    assert after_300 <= after_100 * 1.1 and after_300 < 400_000  # 300 responses would be 3 MB


def test_previous_response_id_to_a_dropped_response_is_a_404(pool, isolated_home):
    s = serve(pool, port=0, mode="thread", responses_max_count=2)
    try:
        c = client(s)
        first, *_ = [c.responses.create(model="tiny", input="Hi", **GREEDY) for _ in range(3)]
        with pytest.raises(openai.NotFoundError) as e:
            c.responses.create(model="tiny", input="Hi", previous_response_id=first.id, **GREEDY)
        assert e.value.body["code"] == "previous_response_not_found"
        with sqlite3.connect(isolated_home / "responses.db") as conn:
            assert conn.execute("SELECT count(*) FROM responses").fetchone()[0] == 2
    finally:
        s.stop(drain=0)


def test_requests_are_audited_as_openai(server, audit):
    c = client(server)
    c.responses.create(model="tiny", input="Hi", **GREEDY)
    with c.responses.stream(model="tiny", input="Hi", **GREEDY) as stream:
        list(stream)
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model="tiny", input="Hi", tools=[{"type": "web_search"}])
    rows = audit.query()
    assert [(r["endpoint"], r["protocol"], r["stream"], r["status"], r["http_status"]) for r in rows] == [
        ("/v1/responses", "openai", False, "error", 400), ("/v1/responses", "openai", True, "ok", 200),
        ("/v1/responses", "openai", False, "ok", 200)]


def test_a_failure_mid_stream_is_response_failed_and_the_server_goes_on(server, pool):
    inner = pool.engine.runner("tiny-llama").model.model
    norm = inner.norm
    events = []

    def broken(*a, **k):
        raise RuntimeError("boom")

    body = json.dumps({"model": "tiny", "input": "Hi", "stream": True, "max_output_tokens": 300, "temperature": 0})
    request = urllib.request.Request(server.url + "/v1/responses", body.encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            for line in r:
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))
                    if events[-1]["type"] == "response.output_text.delta":
                        inner.norm = broken
    finally:
        vars(inner).pop("norm", None)
        inner.norm = norm
    checked_events([(e["type"], e) for e in events])
    failed = validated(events[-1]["response"])
    assert events[-1]["type"] == "response.failed" and failed.status == "failed"
    assert failed.error.code == "server_error" and "boom" in failed.error.message
    assert failed.output[0].status == "incomplete"
    assert client(server).responses.create(model="tiny", input="Hi", **GREEDY).usage.output_tokens == 6


# -- bad input --------------------------------------------------------------------------------------

TINY = {"model": "tiny", "input": "Hi"}
CALL = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"input": "Hi"}, 400, "model"),
        ({"model": "tiny"}, 400, "input"),
        ({"model": "tiny", "input": 5}, 400, "input"),
        ({"model": "tiny", "input": []}, 400, "input"),
        ({"model": "tiny", "input": ["Hi"]}, 400, "input[0]"),
        ({"model": "tiny", "input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role"),
        ({"model": "tiny", "input": [{"role": "user", "content": 3}]}, 400, "input[0].content"),
        ({"model": "tiny", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         400, "input[0].content[0]"),
        ({"model": "tiny", "input": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]},
         400, "input[0].content[0]"),
        ({"model": "tiny", "input": [{"type": "reasoning", "summary": []}]}, 400, "input[0].type"),
        ({"model": "tiny", "input": [{**CALL, "call_id": None}]}, 400, "input[0].call_id"),
        ({**TINY, "tools": [{"type": "web_search"}]}, 400, "tools"),
        ({**TINY, "tools": [{"type": "file_search", "vector_store_ids": []}]}, 400, "tools"),
        ({**TINY, "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, 400, "tools"),
        ({**TINY, "tools": [{"type": "function", "name": "bad name"}]}, 400, "tools[0].name"),
        ({**TINY, "tool_choice": {"type": "function", "name": "g"}}, 400, "tool_choice"),
        ({**TINY, "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}}, 400,
         "text.format.schema"),
        ({**TINY, "text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format.schema"),
        ({**TINY, "reasoning": {"effort": "high"}}, 400, "reasoning.effort"),
        ({**TINY, "reasoning": {"summary": "verbose"}}, 400, "reasoning.summary"),
        ({**TINY, "background": True}, 400, "background"),
        ({**TINY, "conversation": "conv_1"}, 400, "conversation"),
        ({**TINY, "metadata": {"k": 1}}, 400, "metadata"),
        ({**TINY, "max_output_tokens": 0}, 400, "max_output_tokens"),
        ({**TINY, "top_p": 2}, 400, "top_p"),
        ({**TINY, "max_output_tokens": 10**6}, 400, "max_output_tokens"),
        ({**TINY, "input": "word " * 600}, 400, "input"),
        ({**TINY, "previous_response_id": "resp_nope"}, 404, "previous_response_id"),
        ({"model": "nope", "input": "Hi"}, 404, "model"),
    ],
)
def test_bad_requests_name_the_field(server, body, status, param):
    code, _, err = call(server.url + "/v1/responses", body)
    assert (code, err["error"]["param"]) == (status, param), err
    assert set(err["error"]) == {"message", "type", "param", "code"}


def test_a_prompt_over_the_context_is_context_length_exceeded(server):
    code, _, err = call(server.url + "/v1/responses", {**TINY, "input": "word " * 600, "stream": True})
    assert (code, err["error"]["code"], err["error"]["param"]) == (400, "context_length_exceeded", "input")


def test_fields_that_ask_for_nothing_are_accepted(server):
    r = client(server).responses.create(
        model="tiny", input=[{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "x"}]},
                             {"role": "user", "content": "Hi"}],
        tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}],
        tool_choice="none", reasoning={"effort": "minimal"}, text={"format": {"type": "text"}}, truncation="disabled",
        background=False, include=[], parallel_tool_calls=False, **GREEDY)
    assert r.tools[0].name == "f" and r.tool_choice == "none" and r.parallel_tool_calls is False
    assert r.reasoning.effort == "minimal"


def test_a_reasoning_summary_is_accepted_and_shows_nothing(server):
    """inspect-ai's OpenAI-compatible provider asks every Responses model for one, as OpenAI's models that do
    not reason accept: these models do no reasoning, so the answer is the message alone."""
    r = client(server).responses.create(model="tiny", input="Hi", reasoning={"summary": "auto"}, **GREEDY)
    assert [item.type for item in r.output] == ["message"]
    assert r.reasoning.summary == "auto" and r.usage.output_tokens_details.reasoning_tokens == 0


# -- tools and structured output ---------------------------------------------------------------------


def fake_result(text: str, calls: list, finish: str) -> SimpleNamespace:
    """A Result as the tools machinery makes it: with ``tool_calls``."""
    return Result("req_1", "tiny", text, finish, None, Usage(10, 5, 4), 0.1, 50.0, 0.2, tool_calls=calls)


CALLS = [SimpleNamespace(id="call_1", name="get_weather", arguments='{"city": "Paris"}'),
         SimpleNamespace(id="call_2", name="get_time", arguments="{}")]
TOOLS = [{"type": "function", "name": n, "description": None, "parameters": {}, "strict": True}
         for n in ("get_weather", "get_time")]
DRAFT = Draft("resp_1", "tiny", 0, {"instructions": None, "max_output_tokens": None, "metadata": {},
                                    "parallel_tool_calls": True, "previous_response_id": None, "reasoning": None,
                                    "temperature": 0, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
                                    "tools": TOOLS, "top_p": 1.0, "truncation": "disabled", "user": None})


def without_ids(response: Response) -> dict:
    return response.model_dump(exclude={"output": {"__all__": {"id"}}, "completed_at": True})


@pytest.mark.parametrize("text", ["Let me look.", ""])
def test_function_calls_are_output_items_streamed_and_not(text):
    result = fake_result(text, CALLS, "tool_calls")
    response = validated(final(DRAFT, result))
    assert [item.type for item in response.output] == ["message"] * bool(text) + ["function_call"] * 2
    assert [(c.call_id, c.name, c.arguments, c.status) for c in response.output[bool(text):]] == [
        ("call_1", "get_weather", '{"city": "Paris"}', "completed"), ("call_2", "get_time", "{}", "completed")]
    assert response.status == "completed" and response.usage.input_tokens_details.cached_tokens == 4

    stored = []
    shape = stream_shape(DRAFT, lambda body: stored.append(body) or body)
    events = shape.start(SimpleNamespace(prompt_tokens=10, logprobs=None))  # a stream that asked for no logprobs
    for piece in ([text[:4], text[4:]] if text else []):
        events += shape.delta(piece)
    for i, c in enumerate(CALLS):  # each call's name, then its arguments in two pieces, then the call
        for arguments in ("", c.arguments[:1], c.arguments[1:]):
            events += shape.call_piece(CallPiece(i, c.id, c.name, arguments))
        events += shape.tool_call(c)
    events += shape.end(result)
    text_events = ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
                   "response.output_text.delta", "response.output_text.done", "response.content_part.done",
                   "response.output_item.done"]
    call_events = ["response.output_item.added", "response.function_call_arguments.delta",
                   "response.function_call_arguments.delta", "response.function_call_arguments.done",
                   "response.output_item.done"]
    assert checked_events(events) == ["response.created", "response.in_progress", *text_events * bool(text),
                                      *call_events * 2, "response.completed"]
    assert without_ids(validated(events[-1][1]["response"])) == without_ids(response)
    assert stored == [events[-1][1]["response"]]
    # the SDK's own accumulator (client.responses.stream) rebuilds the same response from the events
    state = ResponseStreamState(input_tools=TOOLS, text_format=openai.omit)
    for _, data in events:
        state.handle_event(EVENT.validate_python(data))
    rebuilt = state._completed_response
    assert [(o.type, getattr(o, "arguments", None)) for o in rebuilt.output] == [
        (o.type, getattr(o, "arguments", None)) for o in response.output]


def test_function_call_items_become_the_chat_the_pool_takes():
    items = _input_items({"input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_text", "text": "18C"}]},
        {"type": "function_call_output", "call_id": "call_2", "output": "noon"}]})
    assert [m.template() for m in _messages(items, "Be brief.")] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "noon"}]
    tools = [{**t, "parameters": {"type": "object"}} for t in TOOLS]
    as_tools = tuple(Tool(n, "", {"type": "object"}, True) for n in ("get_weather", "get_time"))
    plain = {"format": {"type": "text"}}
    assert _structure(tools, {"type": "function", "name": "get_time"}, False, plain) == {
        "tools": as_tools, "tool_choice": "get_time", "schema": None, "parallel_tool_calls": False}
    text = {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}}
    assert _structure(tools, "none", True, text) == {
        "tools": as_tools, "tool_choice": "none", "schema": {"type": "object"}, "parallel_tool_calls": True}


# -- openai-agents on the real demo model ------------------------------------------------------------


@pytest.fixture
def demo_server(make_pool, demo_home, isolated_home, monkeypatch):
    """A server over the demo model; its stored responses go to the test's own home."""
    monkeypatch.setenv("MLX_NB_HOME", str(demo_home))
    pool = make_pool(keep_alive=None)
    pool.load("demo")
    monkeypatch.setenv("MLX_NB_HOME", str(isolated_home))
    s = serve(pool, port=0, mode="thread")
    yield s
    s.stop(drain=0)


@pytest.mark.slow
def test_agents_sdk_run_and_streamed_run(demo_server):
    from agents import Agent, ModelSettings, Runner, set_default_openai_client, set_tracing_disabled

    set_tracing_disabled(True)
    question = "What is the capital of France?"

    async def main():
        client = openai.AsyncOpenAI(base_url=demo_server.url + "/v1", api_key="unused")
        set_default_openai_client(client, use_for_tracing=False)
        agent = Agent(name="Geographer", instructions="Answer in one short sentence.", model="demo",
                      model_settings=ModelSettings(temperature=0, max_tokens=60))
        plain = await Runner.run(agent, question)
        streamed = Runner.run_streamed(agent, question)
        kinds = [event.type async for event in streamed.stream_events()]
        await client.close()
        return plain, streamed, kinds

    plain, streamed, kinds = asyncio.run(main())
    assert "Paris" in plain.final_output
    assert streamed.final_output == plain.final_output and "raw_response_event" in kinds
    response = plain.raw_responses[0]  # from /v1/responses, the agents SDK's default
    assert response.response_id.startswith("resp_") and response.usage.output_tokens > 0


@pytest.mark.slow
def test_agents_sdk_runs_a_function_tool(demo_server):
    from agents import Agent, ModelSettings, Runner, function_tool, set_default_openai_client, set_tracing_disabled

    set_tracing_disabled(True)
    asked = []

    @function_tool
    def capital_of(country: Literal["France", "Italy", "Spain"]) -> str:  # a free string can run on in a 135M model
        """The capital city of a country."""
        asked.append(country)
        return "Paris"

    async def main():
        client = openai.AsyncOpenAI(base_url=demo_server.url + "/v1", api_key="unused")
        set_default_openai_client(client, use_for_tracing=False)
        # the first turn must call the tool; the SDK then resets tool_choice, so the model answers
        agent = Agent(name="Geographer", instructions="Use the tool, then answer in one sentence.", model="demo",
                      tools=[capital_of], model_settings=ModelSettings(temperature=0, max_tokens=300,
                                                                       tool_choice="required",
                                                                       parallel_tool_calls=False))
        result = await Runner.run(agent, "What is the capital of France?")
        await client.close()
        return result

    result = asyncio.run(main())
    assert len(asked) == 1 and asked[0] in ("France", "Italy", "Spain")
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"
    assert isinstance(result.final_output, str) and result.final_output

@pytest.fixture
def tools_server(make_pool, wide_tiny_model_path):
    """A server over the tiny model with room in its context for a tool listing."""
    pool = make_pool(keep_alive=None)
    pool.load(wide_tiny_model_path, alias="wide")
    s = serve(pool, port=0, mode="thread")
    yield s
    s.stop(drain=0)


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                          "required": ["city"], "additionalProperties": False}}


def test_a_required_function_call_round_trip_with_the_sdk(tools_server):
    oa = client(tools_server)
    first = oa.responses.create(model="wide", input="Weather in Paris?", tools=[WEATHER], tool_choice="required",
                                parallel_tool_calls=False, max_output_tokens=200, temperature=0)
    strict(first)
    (call_item,) = [o for o in first.output if o.type == "function_call"]
    assert call_item.name == "get_weather" and json.loads(call_item.arguments)["city"] in ("Paris", "Rome")
    second = oa.responses.create(model="wide", previous_response_id=first.id, tools=[WEATHER], max_output_tokens=8,
                                 temperature=0, tool_choice="none", input=[
                                     {"type": "function_call_output", "call_id": call_item.call_id,
                                      "output": "18C and sunny"}])
    strict(second)
    assert second.output[0].type == "message"
    kinds = [item.type for item in oa.responses.input_items.list(second.id, order="asc").data]
    assert kinds == ["message", "function_call", "function_call_output"]


def test_a_streamed_function_call_accumulates_in_the_sdk(tools_server):
    named = {"type": "function", "name": "get_weather"}
    with client(tools_server).responses.stream(model="wide", input="Weather?", tools=[WEATHER], tool_choice=named,
                                               parallel_tool_calls=False, max_output_tokens=200,
                                               temperature=0) as stream:
        final_response = stream.get_final_response()
    (call_item,) = final_response.output
    assert call_item.type == "function_call" and json.loads(call_item.arguments)["city"] in ("Paris", "Rome")


def test_function_call_arguments_stream_as_they_are_generated(tools_server):
    with client(tools_server).responses.stream(model="wide", input="Weather?", tools=[WEATHER],
                                               tool_choice="required", parallel_tool_calls=False,
                                               max_output_tokens=200, temperature=0) as stream:
        events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    (call_item,) = events[-1].response.output
    assert len(deltas) > 3 and "".join(deltas) == done.arguments == call_item.arguments
    kinds = [e.type for e in events]
    assert kinds.index("response.output_item.added") < kinds.index("response.function_call_arguments.delta")


class City(BaseModel):
    name: Literal["Paris", "Rome"]  # the random tiny model would fill a free string to the token limit
    sunny: bool


def test_responses_parse_returns_a_validated_object(tools_server):
    r = client(tools_server).responses.parse(model="wide", input="A city?", text_format=City, max_output_tokens=200,
                                              temperature=1)
    assert isinstance(r.output_parsed, City)


def test_hostile_responses_bodies_are_400s_beside_bystander_streams(server, pool):
    from test_hostile import post_raw, with_bystanders

    url = server.url + "/v1/responses"
    deep = b'{"model": "tiny", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert with_bystanders(server, pool, lambda http: post_raw(http, url, deep))[0] == 400
    huge = json.dumps({"model": "tiny", "input": "x" * 7_000_000}).encode()
    status, answer = with_bystanders(server, pool, lambda http: post_raw(http, url, huge))
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
    nan = b'{"model": "tiny", "input": "Hi", "temperature": NaN}'
    assert with_bystanders(server, pool, lambda http: post_raw(http, url, nan))[0] == 400
