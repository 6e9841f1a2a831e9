"""Tools and structured output on the Anthropic Messages endpoint, with the official SDK, on the
tiny random-weight model (its calls and objects parse because a grammar allows nothing else)."""

import asyncio
import json
from typing import Literal

import aiohttp
import anthropic
import jsonschema
import pytest
from helpers import call
from pydantic import BaseModel

ASK = [{"role": "user", "content": "Weather?"}]
WEATHER = {"name": "get_weather", "description": "Get the weather for a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                             "unit": {"type": "string", "enum": ["C", "F"]}},
                            "required": ["city", "unit"], "additionalProperties": False}}
ADD = {"name": "add", "description": "Add two digits.",
       "input_schema": {"type": "object", "properties": {"a": {"type": "integer", "enum": [1, 2, 3]},
                                                         "b": {"type": "integer", "enum": [4, 5]}},
                        "required": ["a", "b"], "additionalProperties": False}}
# seeded; room for every distinct call before a repeat ends the turn (this SDK takes no temperature or seed)
FORCED = dict(model="tiny", max_tokens=600, extra_body={"temperature": 1.0, "seed": 4})
GREEDY = {"temperature": 0}


class Verdict(BaseModel):
    sky: Literal["sunny", "rainy"]
    windy: bool


@pytest.fixture(scope="module")
def server(wide_server):
    return wide_server


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def test_a_streamed_tool_use_loop(client):
    with client.messages.stream(messages=ASK, tools=[WEATHER], tool_choice={"type": "any"}, **FORCED) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use"
    uses = [b for b in message.content if b.type == "tool_use"]
    assert uses and all(b.name == "get_weather" for b in uses)
    jsonschema.validate(uses[0].input, WEATHER["input_schema"])
    assert uses[0].id.startswith("toolu_")
    history = [*ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": b.id, "content": "sunny, 21"} for b in uses]}]
    with client.messages.stream(messages=history, tools=[WEATHER], model="tiny", max_tokens=5,
                                extra_body=GREEDY) as stream:
        answer = stream.get_final_message()
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text


def test_the_raw_stream_frames_a_call_as_a_tool_use_block(server):
    body = {"model": "tiny", "max_tokens": 200, "temperature": 1.0, "stream": True, "messages": ASK, "tools": [ADD],
            "tool_choice": {"type": "tool", "name": "add", "disable_parallel_tool_use": True}}

    async def main():
        async with aiohttp.ClientSession() as session, session.post(server.url + "/v1/messages", json=body) as r:
            return [json.loads(line[6:]) async for line in r.content if line.startswith(b"data: ")]

    events = asyncio.run(main())
    kinds = [e["type"] for e in events]
    deltas = events[3:-3]  # the input, as it is generated
    assert kinds == ["message_start", "content_block_start", "ping", *["content_block_delta"] * len(deltas),
                     "content_block_stop", "message_delta", "message_stop"] and len(deltas) > 3
    start = events[1]
    assert {e["index"] for e in [start, *deltas, events[-3]]} == {0}
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}
    assert {d["delta"]["type"] for d in deltas} == {"input_json_delta"}
    jsonschema.validate(json.loads("".join(d["delta"]["partial_json"] for d in deltas)), ADD["input_schema"])
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


def test_the_sdk_sees_the_input_grow_as_it_is_generated(client):
    with client.messages.stream(messages=ASK, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
                                **FORCED) as stream:
        events = list(stream)
        message = stream.get_final_message()
    pieces = [e for e in events if e.type == "input_json"]
    (use,) = message.content
    assert len(pieces) > 3 and json.loads("".join(e.partial_json for e in pieces)) == use.input
    assert pieces[-1].snapshot == use.input and [e.type for e in events][-1] == "message_stop"


def test_a_named_tool_non_streamed(client):
    m = client.messages.create(messages=ASK, tools=[WEATHER, ADD],
                               tool_choice={"type": "tool", "name": "add", "disable_parallel_tool_use": True}, **FORCED)
    assert m.stop_reason == "tool_use"
    (use,) = m.content
    assert use.type == "tool_use" and use.name == "add"
    jsonschema.validate(use.input, ADD["input_schema"])


def test_none_and_auto_answer_in_text(client):
    m = client.messages.create(messages=ASK, tools=[ADD], tool_choice={"type": "none"}, model="tiny",
                               max_tokens=4, extra_body=GREEDY)
    assert [b.type for b in m.content] == ["text"] and m.stop_reason != "tool_use"


def test_tool_results_as_text_blocks_and_errors_are_accepted(client):
    history = [*ASK, {"role": "assistant", "content": [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "unit": "C"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome", "unit": "C"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "sunny"}]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "no station", "is_error": True},
            {"type": "text", "text": "And tomorrow?"}]}]
    m = client.messages.create(messages=history, tools=[WEATHER], model="tiny", max_tokens=3, extra_body=GREEDY)
    assert m.content[0].type == "text"


def test_structured_output_through_parse(client):
    m = client.messages.parse(messages=ASK, output_format=Verdict, **FORCED)
    assert isinstance(m.parsed_output, Verdict)
    assert m.stop_reason == "end_turn"


def test_output_config_format_is_honoured(client):
    schema = Verdict.model_json_schema() | {"additionalProperties": False}
    m = client.messages.create(messages=ASK, output_config={"format": {"type": "json_schema", "schema": schema}},
                               **FORCED)
    jsonschema.validate(json.loads(m.content[0].text), schema)


def test_count_tokens_counts_the_tools(client):
    without = client.messages.count_tokens(model="tiny", messages=ASK).input_tokens
    with_tools = client.messages.count_tokens(model="tiny", messages=ASK, tools=[WEATHER]).input_tokens
    assert with_tools > without + 20


BAD_SCHEMA = {"type": "object", "properties": {"a": {"type": "bogus"}}}


@pytest.mark.parametrize(("extra", "field"), [
    ({"tools": [{**ADD, "name": "has space"}]}, "tools.0.name"),
    ({"tools": [ADD, {**WEATHER, "input_schema": BAD_SCHEMA}]}, "tools.1.input_schema"),
    ({"tools": [ADD], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
    ({"tools": [ADD], "tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
    ({"container": "container_011"}, "'container'"),  # no code execution to run it in
    ({"container": {}}, "'container'"),
    ({"output_config": {"effort": "low"}}, "output_config.effort"),  # less effort than the answer took
    ({"output_config": {"format": {"type": "json_schema", "schema": BAD_SCHEMA}}}, "output_config.format.schema"),
    ({"messages": [*ASK, {"role": "assistant", "content": "ok"}, {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_unknown", "content": "7"}]}]},
     "messages.2.content.0.tool_use_id"),
])
def test_bad_input_is_a_400_naming_the_field(server, extra, field):
    body = {"model": "tiny", "max_tokens": 5, "messages": ASK, **extra}
    status, _, reply = call(server.url + "/v1/messages", body)
    assert status == 400, reply
    assert reply["type"] == "error" and reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["message"].startswith(field), reply["error"]["message"]


def test_the_sdk_raises_bad_request_for_an_unknown_tool_use_id(client):
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="tiny", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_x", "content": "7"}]}])
    assert "tool_use_id" in caught.value.message


def test_a_call_after_text_opens_the_next_block():
    from mlx_manager_nb.server.anthropic_api import _shape
    from mlx_manager_nb.streams import Result, Usage
    from mlx_manager_nb.tools import CallPiece, ToolCall

    shape = _shape("msg_1", "tiny")
    call_ = ToolCall("call_ab", "add", '{"a": 1, "b": 4}')
    pieces = [CallPiece(0, "call_ab", "add", text) for text in ("", '{"a": 1, ', '"b": 4}')]
    events = [*shape.delta("Let me"), *shape.delta(" add.")]
    events += [event for piece in pieces for event in shape.call_piece(piece)] + shape.tool_call(call_)
    events += shape.end(Result(id="r", model="tiny", text="Let me add.", finish_reason="tool_calls", stop=None,
                               usage=Usage(3, 9), ttft=None, tokens_per_second=None, duration=0.1,
                               tool_calls=[call_]))
    framed = [(e["type"], e.get("index")) for _, e in events]
    assert framed == [("content_block_start", 0), ("ping", None), ("content_block_delta", 0),
                      ("content_block_delta", 0), ("content_block_stop", 0), ("content_block_start", 1),
                      ("content_block_delta", 1), ("content_block_delta", 1), ("content_block_stop", 1),
                      ("message_delta", None), ("message_stop", None)]
    assert events[5][1]["content_block"] == {"type": "tool_use", "id": "toolu_ab", "name": "add", "input": {}}
    assert json.loads(events[6][1]["delta"]["partial_json"] + events[7][1]["delta"]["partial_json"]) == {"a": 1, "b": 4}
