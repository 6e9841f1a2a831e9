"""The client libraries people point at a local server, with tools and structured output, on the
real demo model at temperature 0: each library's own requests and parsing through our server, and
answers that make sense (the tiny-model tests in test_tools.py and test_anthropic_tools.py cover
the protocols' mechanics at temperature 1)."""

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Literal

import anthropic
import openai
import pytest
from pydantic import BaseModel

from mlx_manager_nb.model_pool import Pool
from mlx_manager_nb.server import serve

pytestmark = pytest.mark.slow


class City(BaseModel):
    """A city and where it is."""

    name: str
    country: str
    continent: Literal["Africa", "America", "Asia", "Europe", "Oceania"]


ABOUT_PARIS = [{"role": "user", "content": "Tell me about Paris."}]
ASK = [{"role": "user", "content": "What is the temperature in Paris right now?"}]
TEMPERATURE = {"type": "function", "function": {
    "name": "get_temperature", "description": "Get the current temperature in a city, in degrees Celsius.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def get_temperature(city: Literal["Paris", "Rome", "Oslo"]) -> str:
    """Get the current temperature in a city, in degrees Celsius."""
    return "21"


@pytest.fixture(scope="module")
def demo_server(demo_home):
    from mlx_manager_nb.demo import DEMO_NAME

    pool = Pool(keep_alive=None)
    pool.load(demo_home / "models" / DEMO_NAME, alias="demo")
    s = serve(pool, port=0, mode="thread", store_responses=False)
    yield s
    s.stop(drain=0)
    pool.close()


@pytest.fixture(scope="module")
def base_url(demo_server):
    return demo_server.url + "/v1"


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


# -- openai ---------------------------------------------------------------------------------------


def test_openai_parse_returns_a_validated_object(client):
    r = client.chat.completions.parse(model="demo", messages=ABOUT_PARIS, response_format=City, temperature=0,
                                      max_tokens=100)
    assert r.choices[0].message.parsed == City(name="Paris", country="France", continent="Europe")


def test_openai_tool_round_trip(client):
    # parallel calls allowed (the default): the model repeats its call, and the repeat ends the turn
    first = client.chat.completions.create(model="demo", messages=ASK, tools=[TEMPERATURE], tool_choice="required",
                                           temperature=0, max_tokens=100)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_temperature" and json.loads(call.function.arguments) == {"city": "Paris"}
    history = [*ASK, choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id,
                                                                    "content": "21"}]
    answer = client.chat.completions.create(model="demo", messages=history, tools=[TEMPERATURE], temperature=0,
                                            max_tokens=60)
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    assert "21" in answer.choices[0].message.content


def test_openai_stream_helper_accumulates_the_whole_call(client):
    with client.chat.completions.stream(model="demo", messages=ASK, tools=[TEMPERATURE], tool_choice="required",
                                        temperature=0, max_tokens=100) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert call.function.name == "get_temperature" and json.loads(call.function.arguments) == {"city": "Paris"}
    history = [*ASK, final.choices[0].message.model_dump(exclude_none=True, exclude={"parsed"}),
               {"role": "tool", "tool_call_id": call.id, "content": "21"}]
    with client.chat.completions.stream(model="demo", messages=history, tools=[TEMPERATURE], temperature=0,
                                        max_tokens=60) as stream:
        answer = stream.get_final_completion()
    assert "21" in answer.choices[0].message.content and not answer.choices[0].message.tool_calls


# -- anthropic ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def claude(demo_server):
    return anthropic.Anthropic(base_url=demo_server.url, api_key="unused", max_retries=0)


WEATHER = {"name": "get_temperature", "description": TEMPERATURE["function"]["description"],
           "input_schema": TEMPERATURE["function"]["parameters"]}


def test_anthropic_tool_use_loop_streamed(claude):
    with claude.messages.stream(model="demo", max_tokens=100, messages=ASK, tools=[WEATHER],
                                tool_choice={"type": "any"}, extra_body={"temperature": 0}) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use"
    (use,) = [b for b in message.content if b.type == "tool_use"]
    assert use.name == "get_temperature" and use.input == {"city": "Paris"}
    history = [*ASK, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in message.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21"}]}]
    with claude.messages.stream(model="demo", max_tokens=60, messages=history, tools=[WEATHER],
                                extra_body={"temperature": 0}) as stream:
        answer = stream.get_final_message()
    assert answer.stop_reason == "end_turn" and [b.type for b in answer.content] == ["text"]
    assert "21" in answer.content[0].text


def test_anthropic_parse_returns_a_validated_object(claude):
    m = claude.messages.parse(model="demo", max_tokens=100, messages=ABOUT_PARIS, output_format=City,
                              extra_body={"temperature": 0})
    assert m.parsed_output == City(name="Paris", country="France", continent="Europe")


# -- langchain-openai -----------------------------------------------------------------------------


@pytest.fixture
def chat(base_url):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="demo", base_url=base_url, api_key="unused", max_retries=0, temperature=0,
                      max_tokens=100)


def test_langchain_bind_tools_returns_tool_calls(chat):
    message = chat.bind_tools([get_temperature], tool_choice="required").invoke(ASK[0]["content"])
    (call,) = message.tool_calls
    assert call["name"] == "get_temperature" and call["args"] == {"city": "Paris"} and call["id"]
    assert message.response_metadata["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_with_structured_output(chat, method):
    out = chat.with_structured_output(City, method=method).invoke(ABOUT_PARIS[0]["content"])
    assert isinstance(out, City) and out.name == "Paris"  # as a tool call, the model may place Paris in "Europe"


# -- pydantic-ai ----------------------------------------------------------------------------------


def _pydantic_ai_agent(base_url, settings, **kwargs):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("demo", provider=OpenAIProvider(base_url=base_url, api_key="unused"))
    return Agent(model, model_settings=settings, **kwargs)


@pytest.mark.parametrize("native", [False, True], ids=["tool_output", "native_output"])
def test_pydantic_ai_output_type(base_url, native):
    from pydantic_ai import NativeOutput

    agent = _pydantic_ai_agent(base_url, {"temperature": 0, "max_tokens": 100},
                               output_type=NativeOutput(City) if native else City)
    out = agent.run_sync("Tell me about Paris.").output
    assert isinstance(out, City) and out.name == "Paris"


def test_pydantic_ai_function_tool(base_url):
    calls = []
    # pydantic-ai's way to force a tool on the first step only: the demo model does not call one unasked
    agent = _pydantic_ai_agent(base_url, lambda ctx: {"temperature": 0, "max_tokens": 100,
                                                      "tool_choice": "required" if ctx.run_step <= 1 else "auto"})

    @agent.tool_plain
    def get_temperature(city: Literal["Paris", "Rome", "Oslo"]) -> str:
        """Get the current temperature in a city, in degrees Celsius."""
        calls.append(city)
        return "21"

    result = agent.run_sync(ASK[0]["content"])
    assert calls == ["Paris"] and "21" in result.output
    parts = [p.part_kind for m in result.all_messages() for p in m.parts]
    assert parts == ["user-prompt", "tool-call", "tool-return", "text"]


# -- instructor, in a virtualenv of its own (tests/clients/instructor.txt) -------------------------

INSTRUCTOR = Path(__file__).parent / "clients" / "instructor_client.py"


@pytest.mark.parametrize("mode", ["TOOLS", "TOOLS_STRICT", "JSON_SCHEMA", "JSON"])
def test_instructor_modes(instructor_python, base_url, mode):
    done = subprocess.run([str(instructor_python), str(INSTRUCTOR), base_url, mode], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"name": "Paris", "country": "France", "continent": "Europe"}


def test_instructor_create_partial_sees_the_object_grow(instructor_python, base_url):
    """The tool call's arguments stream as they are generated, so instructor's partial objects fill in
    field by field instead of arriving whole at the end."""
    done = subprocess.run([str(instructor_python), str(INSTRUCTOR), base_url, "TOOLS", "partial"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["last"] == {"name": "Paris", "country": "France", "continent": "Europe"}
    assert seen["partials"] >= 4  # at least: empty, then each of the three fields as it arrives


# -- openai-agents, on Chat Completions -----------------------------------------------------------


def test_openai_agents_chat_completions_model_with_a_function_tool(base_url):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)
    calls = []

    @function_tool
    def get_temperature(city: Literal["Paris", "Rome", "Oslo"]) -> str:
        """Get the current temperature in a city, in degrees Celsius."""
        calls.append(city)
        return "21"

    async def main():
        client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        model = OpenAIChatCompletionsModel(model="demo", openai_client=client)
        # the first turn must call the tool; the SDK then resets tool_choice, so the model answers
        agent = Agent(name="weather", instructions="Answer briefly.", model=model, tools=[get_temperature],
                      model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=100))
        try:
            return await Runner.run(agent, ASK[0]["content"], max_turns=4)
        finally:
            await client.close()

    result = asyncio.run(main())
    assert calls == ["Paris"]
    items = [item.type for item in result.new_items]
    assert items == ["tool_call_item", "tool_call_output_item", "message_output_item"]
    assert "21" in result.final_output
