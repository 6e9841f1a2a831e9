"""Tools: definitions, the fallback format, forced calls on the tiny random-weight model (whose
calls parse because a grammar allows nothing else), the chain helper, streaming and bad input."""

import json
import shutil
from typing import Annotated, Literal

import jsonschema
import pytest
from pydantic import Field

from mlx_manager_nb import runner
from mlx_manager_nb.chain import rounds
from mlx_manager_nb.errors import InvalidParameterError
from mlx_manager_nb.model_pool import Pool
from mlx_manager_nb.request import python_request
from mlx_manager_nb.tools import CallParser, CallPiece, ToolCall, function_tool, make_tools, render_fallback

ASK = [{"role": "user", "content": "Weather?"}]


def get_weather(city: Literal["Paris", "Rome", "Oslo"], days: int = 1) -> dict:
    """Get the weather forecast for a city.

    Longer text that is not part of the description."""
    return {"city": city, "days": days, "sky": "sunny"}


ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two digits.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 9}},
                   "required": ["a", "b"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def pool(wide_pool):
    return wide_pool


def test_a_python_function_becomes_a_tool():
    tool = function_tool(get_weather)
    assert tool.name == "get_weather" and tool.description == "Get the weather forecast for a city."
    assert tool.parameters["required"] == ["city"]
    assert tool.parameters["properties"]["city"]["enum"] == ["Paris", "Rome", "Oslo"]
    assert tool.parameters["properties"]["days"] == {"type": "integer", "default": 1}
    assert tool.parameters["additionalProperties"] is False  # the function takes no other keywords


def split(items):
    """A parser's items as (content, calls complete)."""
    return "".join(i for i in items if isinstance(i, str)), [i for i in items if isinstance(i, ToolCall)]


def test_the_call_parser_holds_back_a_split_trigger_and_keeps_unparsable_calls_as_text():
    p = CallParser("<tool_call>", "</tool_call>", json.loads)
    texts = ["Sure <tool", "_call>{\"name\": \"f\", \"argu", "ments\": {\"x\": 1}}</tool_call>"]
    out = [split(p.feed(t)) for t in texts]
    assert [o[0] for o in out] == ["Sure ", "", ""]
    assert [c.name for c in out[2][1]] == ["f"] and out[2][1][0].args == {"x": 1}
    q = CallParser("<tool_call>", "</tool_call>", json.loads)
    assert split(q.feed("<tool_call>not json</tool_call>")) == ("<tool_call>not json</tool_call>", [])
    r = CallParser("<tool_call>", "</tool_call>", json.loads)
    r.feed('<tool_call>{"name": "f", "arguments": {}}')
    assert [c.name for c in split(r.finish())[1]] == ["f"]  # the closing tag is optional at the end of the turn


def test_a_repeated_call_is_dropped_and_ends_the_turn():
    p = CallParser("<tool_call>", "</tool_call>", json.loads)
    call = '<tool_call>{"name": "f", "arguments": {"x": 1, "y": 2}}</tool_call>'
    again = '<tool_call>{"name": "f", "arguments": {"x": 1, "y": 2}}</tool_call>'  # the same call
    other = '<tool_call>{"name": "f", "arguments": {"x": 2, "y": 2}}</tool_call>'
    assert [c.args for c in split(p.feed(call + "\n" + other + "\n"))[1]] == [{"x": 1, "y": 2}, {"x": 2, "y": 2}]
    assert p.feed(again + "\nmore text") == [] and p.repeated
    assert p.feed(other) == [] and p.finish() == [] and len(p.calls) == 2
    q = CallParser("<tool_call>", "</tool_call>", json.loads)
    q.feed(call)
    reordered = split(q.feed('<tool_call>{"name": "f", "arguments": {"y": 2, "x": 1}}</tool_call>'))[1]
    assert len(reordered) == 1 and q.repeated  # streamed before it was known to repeat: kept, and the turn ends
    native = CallParser("[TOOL_CALLS]", "", json.loads)  # one body holding a list, as Mistral's parser reads
    native.feed('[TOOL_CALLS][{"name": "f", "arguments": {}}, {"name": "f", "arguments": {}}]')
    assert [c.name for c in split(native.finish())[1]] == ["f"] and native.repeated


def test_a_call_streams_its_name_then_its_arguments_as_they_are_generated():
    p = CallParser("<tool_call>", "</tool_call>", json.loads)
    text = 'Hi <tool_call>{"name": "f", "arguments": {"x": 1, "s": "a}b"}}</tool_call>'
    items = [item for ch in text for item in p.feed(ch)] + p.finish()
    pieces = [i for i in items if isinstance(i, CallPiece)]
    (call,) = [i for i in items if isinstance(i, ToolCall)]
    assert items.index(call) == len(items) - 1 and pieces[0] == CallPiece(0, call.id, "f")
    assert len(pieces) > 10 and "".join(p.arguments for p in pieces) == call.arguments == '{"x": 1, "s": "a}b"}'
    assert "".join(i for i in items if isinstance(i, str)) == "Hi "


def test_a_streamed_call_is_held_back_while_it_may_repeat_and_cut_off_it_keeps_what_was_generated():
    p = CallParser("<tool_call>", "</tool_call>", json.loads)
    first = '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>\n'
    assert split(p.feed(first))[1][0].arguments == '{"x": 1}'
    assert p.feed('<tool_call>{"name": "f", "arguments": {"x": ') == []  # still the first call's text
    pieces = p.feed("2")
    assert [piece.arguments for piece in pieces] == ["", '{"x": 2'] and pieces[0].index == 1
    (cut,) = p.finish()  # max_tokens ended the turn inside the call
    assert (cut.id, cut.arguments) == (pieces[0].id, '{"x": 2')


def test_the_fallback_renders_history_calls_and_results():
    calls = [ToolCall("call_1", "add", '{"a": 1, "b": 2}').to_openai()]
    history = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": None, "tool_calls": calls},
               {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    out = render_fallback(history, make_tools([ADD]))
    assert out[0]["role"] == "system" and '"name":"add"' in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}'
                                                      '</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\n3\n</tool_response>"}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}, "add"])
def test_forced_calls_on_the_tiny_model_parse_and_match_the_parameters(pool, choice):
    schema = ADD["function"]["parameters"]
    for seed in range(5):
        r = pool.chat(ASK, tools=[ADD, get_weather], tool_choice=choice, temperature=1.0, seed=seed,
                      max_tokens=300, parallel_tool_calls=False)
        assert r.finish_reason == "tool_calls", r.text
        assert r.tool_calls and r.text == ""
        for call in r.tool_calls:
            assert call.id.startswith("call_")
            if choice != "required":
                assert call.name == "add"
            if call.name == "add":
                jsonschema.validate(call.args, schema)
            else:
                assert call.args["city"] in ("Paris", "Rome", "Oslo")
        assert r.constrained


def test_a_named_tool_is_called_exactly_once_even_with_parallel_calls_allowed(pool):
    # instructor's TOOLS mode names its one function and reads exactly one call
    for seed in range(5):
        r = pool.chat(ASK, tools=[ADD], tool_choice="add", temperature=1.0, seed=seed, max_tokens=300)
        assert r.finish_reason == "tool_calls" and len(r.tool_calls) == 1, r.text


def test_auto_lets_the_model_answer_in_text(pool):
    r = pool.chat(ASK, tools=[ADD], temperature=0, max_tokens=20)
    assert r.finish_reason in ("stop", "length") and r.text and not r.tool_calls


def test_none_leaves_tools_out(pool):
    with_none = pool.chat(ASK, tools=[ADD], tool_choice="none", temperature=0, max_tokens=10)
    assert with_none.text == pool.chat(ASK, temperature=0, max_tokens=10).text
    assert not with_none.constrained


def test_streamed_calls_arrive_as_events_and_on_the_result(pool):
    s = pool.chat(ASK, tools=[ADD], tool_choice="required", temperature=1.0, seed=7, max_tokens=300, stream=True,
                  parallel_tool_calls=False)
    items = list(s.events())
    calls = [i for i in items if isinstance(i, ToolCall)]
    assert len(calls) == 1 and calls == s.result.tool_calls == s.tool_calls
    assert "".join(i for i in items if isinstance(i, str)) == s.result.text == ""
    assert s.result.finish_reason == "tool_calls"


def test_plain_iteration_of_a_tool_stream_yields_text_only(pool):
    s = pool.chat(ASK, tools=[ADD], tool_choice="required", temperature=1.0, seed=8, max_tokens=300, stream=True,
                  parallel_tool_calls=False)
    assert list(s) == [] and s.result.tool_calls


def test_the_async_api_takes_tools(pool):
    import asyncio

    async def main():
        kw = dict(tools=[ADD], tool_choice="add", temperature=1.0, seed=9, max_tokens=300)
        r = await pool.achat(ASK, **kw)
        s = pool.achat(ASK, stream=True, **kw)
        items = [i async for i in s.events()]
        return r, items

    r, items = asyncio.run(main())
    assert r.tool_calls[0].name == "add" and [i.arguments for i in items] == [c.arguments for c in r.tool_calls]


def test_a_chain_runs_the_function_and_returns_the_answer(pool):
    seen = []

    def add(a: Annotated[int, Field(ge=0, le=9)], b: Annotated[int, Field(ge=0, le=9)]) -> int:
        """Add two numbers."""
        seen.append((a, b))
        return a + b

    schema_tool = make_tools([add])[0]
    assert schema_tool.fn is add
    result, transcript = pool.chain([{"role": "user", "content": "2+3?"}], tools=[add], tool_choice="required",
                                    max_rounds=1, temperature=1.0, seed=1, max_tokens=100, parallel_tool_calls=False)
    roles = [m["role"] for m in transcript]
    assert roles == ["user", "assistant", "tool", "assistant"]
    call = transcript[1]["tool_calls"][0]
    assert call["function"]["name"] == "add" and len(seen) == 1
    assert transcript[2] == {"role": "tool", "tool_call_id": call["id"], "name": "add", "content": str(sum(seen[0]))}
    assert not result.tool_calls and transcript[3]["content"] == result.text


def test_the_loop_forces_an_answer_after_its_rounds_and_stops_when_the_caller_does(pool):
    ran, choices = [], []

    def add(a: Annotated[int, Field(ge=0, le=9)], b: Annotated[int, Field(ge=0, le=9)]) -> int:
        """Add two numbers."""
        ran.append((a, b))
        return a + b

    tools = make_tools([add])

    def ask(messages, choice):
        choices.append(choice)
        return pool.chat(messages, tools=tools, tool_choice=choice, temperature=1.0, seed=1, max_tokens=60,
                         parallel_tool_calls=False)

    messages = [{"role": "user", "content": "2+3?"}]
    first, last = rounds(ask, messages, tools, tool_choice="add", max_rounds=1)
    assert choices == ["add", "none"] and first.tool_calls and not last.tool_calls
    assert len(ran) == 1 and [m["role"] for m in messages] == ["user", "assistant", "tool"]
    ran.clear()
    for reply in rounds(ask, [{"role": "user", "content": "2+3?"}], tools, tool_choice="required"):
        assert reply.tool_calls
        break  # the caller stops: the calls of its last reply never run
    assert ran == []

    def ask_briefly(messages, choice):
        return pool.chat(messages, tools=tools, tool_choice=choice, temperature=0, max_tokens=48)

    (cut,) = rounds(ask_briefly, [{"role": "user", "content": "2+3?"}], tools, tool_choice="add")
    assert cut.finish_reason == "length" and cut.tool_calls  # a call with half its arguments ends the loop


def test_history_with_calls_and_results_is_accepted(pool):
    calls = [ToolCall("call_1", "add", '{"a": 1, "b": 2}').to_openai()]
    history = [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": None, "tool_calls": calls},
               {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    assert pool.chat(history, tools=[ADD], temperature=0, max_tokens=5).usage.completion_tokens > 0


@pytest.mark.parametrize("kwargs, field", [
    (dict(tools=[{"type": "function", "function": {"name": "get weather", "parameters": {"type": "object"}}}]),
     "tools[0].function.name"),
    (dict(tools=[ADD, {"type": "function", "function": {"name": "x", "parameters": {"type": "nonsense"}}}]),
     "tools[1].function.parameters"),
    (dict(tools=[{"type": "function", "function": {"name": "x", "parameters": {"type": "string"}}}]),
     "tools[0].function.parameters"),
    (dict(tools=[{"type": "function", "function": {"name": "x", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "format": "no-such"}}}}}], tool_choice="required"),
     "tools[0].function.parameters"),
    (dict(tools=[ADD], tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
    (dict(tools=[ADD], tool_choice="sometimes"), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[ADD, ADD]), "tools[1]"),
    (dict(tools="add"), "tools"),
    (dict(tools=[ADD], schema={"type": "object"}), "schema"),
])
def test_bad_tools_name_the_field(pool, kwargs, field):
    with pytest.raises(InvalidParameterError) as caught:
        pool.chat(ASK, **kwargs)
    assert caught.value.param == field, caught.value


def test_bad_history_calls_name_the_field(pool):
    with pytest.raises(InvalidParameterError) as caught:
        pool.chat([{"role": "assistant", "content": None, "tool_calls": [{"function": {}}]}])
    assert caught.value.param == "messages[0].tool_calls[0]"


def test_audit_rows_count_and_name_the_calls(pool, audit):
    pool.audit = audit
    try:
        r = pool.chat(ASK, tools=[ADD], tool_choice="add", temperature=1.0, seed=3, max_tokens=300,
                      parallel_tool_calls=False)
        audit.flush()
        (row,) = audit.query()
        assert row["tool_calls"] == len(r.tool_calls) and row["tool_names"] == ",".join(["add"] * len(r.tool_calls))
        assert bool(row["constrained"]) and row["finish_reason"] == "tool_calls"
    finally:
        pool.audit = None


@pytest.mark.slow
def test_a_tool_round_trip_on_the_demo_model(demo_home, monkeypatch):
    monkeypatch.setenv("MLX_NB_HOME", str(demo_home))
    calls = []

    def get_temperature(city: str) -> str:
        """Get the current temperature in a city, in degrees Celsius."""
        calls.append(city)
        return "21"

    pool = Pool(keep_alive=None)
    try:
        pool.load("demo")
        question = [{"role": "user", "content": "What is the temperature in Paris right now?"}]
        result, transcript = pool.chain(question, tools=[get_temperature], tool_choice="required", temperature=0,
                                        max_tokens=60)
        assert calls and transcript[1]["tool_calls"][0]["function"]["name"] == "get_temperature"
        assert transcript[2]["content"] == "21"
        assert result.text and not result.tool_calls
    finally:
        pool.close()


# -- the OpenAI endpoint, with the official SDK -----------------------------------------------------


@pytest.fixture(scope="module")
def client(wide_server):
    import openai

    return openai.OpenAI(base_url=wide_server.url + "/v1", api_key="unused")


def test_openai_tool_calls_non_streamed_then_the_result_goes_back(client):
    kw = dict(model="tiny", tools=[ADD], tool_choice="required", temperature=1.0, seed=2, max_tokens=300,
              parallel_tool_calls=False)
    r = client.chat.completions.create(messages=ASK, **kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "add"
    jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "7"}]
    answer = client.chat.completions.create(messages=history, model="tiny", tools=[ADD], tool_choice="none",
                                            temperature=0, max_tokens=5)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_openai_tool_calls_streamed_as_deltas(client):
    kw = dict(model="tiny", messages=ASK, tools=[ADD], tool_choice={"type": "function", "function": {"name": "add"}},
              temperature=1.0, seed=3, max_tokens=300, parallel_tool_calls=False)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    first, *pieces = calls  # the name, then the arguments as they are generated
    assert first.index == 0 and first.id.startswith("call_") and first.function.name == "add"
    assert len(pieces) > 3 and {(p.index, p.id, p.function.name) for p in pieces} == {(0, None, None)}
    arguments = "".join(p.function.arguments for p in pieces)
    assert json.loads(arguments).keys() == {"a", "b"}
    assert arguments == client.chat.completions.create(**kw).choices[0].message.tool_calls[0].function.arguments
    assert [c for c in chunks if c.choices][-1].choices[0].delta.tool_calls is None  # all sent before the end
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_openai_response_format_json_schema(client):
    from test_structured import NESTED

    r = client.chat.completions.create(
        model="tiny", messages=ASK, temperature=1.0, seed=4, max_tokens=300,
        response_format={"type": "json_schema", "json_schema": {"name": "nested", "schema": NESTED, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), NESTED)


def test_openai_parse_returns_a_validated_object(client):
    from typing import Literal

    from pydantic import BaseModel

    class Verdict(BaseModel):
        answer: Literal["yes", "no"]
        sure: bool

    r = client.chat.completions.parse(model="tiny", messages=ASK, response_format=Verdict, temperature=1.0, seed=5,
                                      max_tokens=300)
    assert isinstance(r.choices[0].message.parsed, Verdict)


def test_openai_stream_helper_accumulates_a_whole_tool_call_then_the_answer(client):
    kw = dict(model="tiny", tools=[ADD], temperature=1.0, seed=6, max_tokens=300, parallel_tool_calls=False)
    with client.chat.completions.stream(messages=ASK, tool_choice="required", **kw) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])
    history = [*ASK, final.choices[0].message.model_dump(exclude_none=True, exclude={"parsed"}),
               {"role": "tool", "tool_call_id": call.id, "content": "7"}]
    # the random tiny model never ends by itself, and the helper refuses an answer cut at max_tokens: plain create
    answer = client.chat.completions.create(messages=history, model="tiny", temperature=0, max_tokens=5)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_openai_bad_tools_are_400s_naming_the_field(client):
    import openai

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=ASK, tools=[ADD], tool_choice={
            "type": "function", "function": {"name": "nope"}})
    assert caught.value.body["param"] == "tool_choice"
    bad = {"type": "function", "function": {"name": "has space", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=ASK, tools=[bad])
    assert caught.value.body["param"] == "tools[0].function.name"


def test_native_parsers_may_return_several_calls_and_have_no_end_marker():
    p = CallParser("[TOOL_CALLS]", "", lambda text: [{"name": "a", "arguments": {}}, {"name": "b", "arguments": "{}"}])
    assert split(p.feed("Hi [TOOL_CALLS]a{} b{}")) == ("Hi ", [])
    assert [c.name for c in split(p.finish())[1]] == ["a", "b"]


NATIVE_TEMPLATE = (  # a Qwen-like template: mlx-lm infers its json_tools parser from it
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}<|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for tc in m.tool_calls or [] %}<tool_call>{{ tc.function.name }}"
    "{% set tool_call = tc.function %}{{ tool_call.name }}{{ tc.function.arguments | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_with_tools_renders_them_and_its_family_parser_reads_the_calls(wide_tiny_model_path, tmp_path):
    path = tmp_path / "native"
    shutil.copytree(wide_tiny_model_path, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": NATIVE_TEMPLATE}))
    p = Pool(keep_alive=None)
    try:
        p.load(path, alias="native")
        tokenizer = p.engine.runner(p.find("native").name).tokenizer
        assert tokenizer.has_tool_calling and tokenizer.tool_call_start == "<tool_call>"
        ids = runner.tokens(p.engine.runner(p.find("native").name), python_request(ASK, tools=[ADD]))[0]
        prompt = tokenizer.decode(ids)
        assert "TOOLS:add;" in prompt and "Tools you can call" not in prompt  # the template's rendering
        r = p.chat(ASK, tools=[ADD], tool_choice="add", temperature=1.0, seed=5, max_tokens=300,
                   parallel_tool_calls=False)
        assert r.finish_reason == "tool_calls" and r.tool_calls[0].name == "add"
        history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [r.tool_calls[0].to_openai()]},
                   {"role": "tool", "tool_call_id": r.tool_calls[0].id, "content": "7"}]
        assert p.chat(history, tools=[ADD], temperature=0, max_tokens=3).usage.completion_tokens > 0
    finally:
        p.close()


# -- log-probabilities with tools ---------------------------------------------------------------------------


TOOL_LOGPROBS = dict(tools=[ADD], tool_choice="required", temperature=1.0, seed=7, max_tokens=300,
                     parallel_tool_calls=False, logprobs=True, top_logprobs=3)


def test_logprobs_with_tools_cover_every_token_under_the_grammars_mask(pool):
    r = pool.chat(ASK, **TOOL_LOGPROBS)
    assert r.tool_calls and r.text == "" and len(r.logprobs) == r.usage.completion_tokens
    generated = bytes(b for e in r.logprobs for b in e.bytes).decode("utf-8", "replace")
    assert '"add"' in generated  # the call's own tokens are listed
    alternatives = [t for e in r.logprobs for t in e.top_logprobs]
    assert all(t.logprob > float("-inf") for t in alternatives)  # what the grammar forbids is never listed
    assert sum(len(e.top_logprobs) < 3 for e in r.logprobs)  # where the grammar allows fewer, only those
    s = pool.chat(ASK, stream=True, **TOOL_LOGPROBS)
    assert list(s) == []  # a stream yields no empty text for them
    assert [(e.id, e.logprob) for e in s.result.logprobs] == [(e.id, e.logprob) for e in r.logprobs]


def test_openai_tool_call_logprobs_streamed_equal_not_streamed(client):
    kw = {k: v for k, v in TOOL_LOGPROBS.items() if k != "tools"}
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[ADD], **kw)
    content = r.choices[0].logprobs.content
    assert r.choices[0].message.tool_calls and len(content) == r.usage.completion_tokens
    streamed = []
    for chunk in client.chat.completions.create(model="tiny", messages=ASK, tools=[ADD], stream=True, **kw):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert [c.model_dump() for c in streamed] == [c.model_dump() for c in content]
