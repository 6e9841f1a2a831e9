"""Client libraries' tools and structured output against the OpenAI chat endpoint, on the tiny
random-weight model: whatever it picks, a grammar makes its calls and objects valid, so what these
tests check is each library's own round trip (its requests, its parsing) through our server."""

import asyncio
import json
from typing import Literal

import pytest
from pydantic import BaseModel


class Weather(BaseModel):
    """The weather in a city."""

    city: Literal["Paris", "Rome", "Oslo"]
    sunny: bool


class GetWeather(BaseModel):
    """Get the weather forecast for a city."""

    city: Literal["Paris", "Rome"]
    unit: Literal["C", "F"]


ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def base_url(wide_server):
    return wide_server.url + "/v1"


# -- langchain-openai -----------------------------------------------------------------------------


@pytest.fixture
def chat(base_url):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="tiny", base_url=base_url, api_key="unused", max_retries=0, temperature=1.0,
                      max_tokens=200, seed=5)


def test_langchain_bind_tools_returns_tool_calls(chat):
    # strict: closed schemas (no extra keys), so the random model's call ends
    message = chat.bind_tools([GetWeather], tool_choice="required", parallel_tool_calls=False, strict=True).invoke(ASK)
    (call,) = message.tool_calls
    assert call["name"] == "GetWeather" and call["id"]
    GetWeather.model_validate(call["args"])
    assert message.response_metadata["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_with_structured_output(chat, method):
    out = chat.with_structured_output(Weather, method=method, strict=True).invoke(ASK)
    assert isinstance(out, Weather)


# -- pydantic-ai ----------------------------------------------------------------------------------


def _pydantic_ai_model(base_url):
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIChatModel("tiny", provider=OpenAIProvider(base_url=base_url, api_key="unused"))


@pytest.mark.parametrize("native", [False, True], ids=["tool_output", "native_output"])
def test_pydantic_ai_output_type(base_url, native):
    from pydantic_ai import Agent, NativeOutput

    agent = Agent(_pydantic_ai_model(base_url), output_type=NativeOutput(Weather) if native else Weather,
                  model_settings={"temperature": 1.0, "seed": 6, "max_tokens": 200})
    result = agent.run_sync(ASK)
    assert isinstance(result.output, Weather)


def test_pydantic_ai_function_tool(base_url):
    from pydantic_ai import Agent
    from pydantic_ai.usage import UsageLimits

    calls = []
    agent = Agent(_pydantic_ai_model(base_url), output_type=Weather,
                  model_settings={"temperature": 1.0, "seed": 7, "max_tokens": 200, "parallel_tool_calls": False})

    @agent.tool_plain
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """Get the weather forecast for a city."""
        calls.append(city)
        return "sunny"

    result = agent.run_sync(ASK, usage_limits=UsageLimits(request_limit=30))
    assert isinstance(result.output, Weather)
    returns = [p.tool_name for m in result.all_messages() for p in m.parts if p.part_kind == "tool-return"]
    assert returns[-1] == "final_result"  # the output is a tool call too
    assert calls and len(calls) == returns.count("get_weather")  # with this seed the model calls the tool first


# -- openai-agents, on Chat Completions -----------------------------------------------------------


def test_openai_agents_chat_completions_model_with_a_function_tool(base_url):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    calls = []

    @function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """Get the weather forecast for a city."""
        calls.append(city)
        return "sunny"

    async def main():
        client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        model = OpenAIChatCompletionsModel(model="tiny", openai_client=client)
        agent = Agent(name="weather", instructions="Answer briefly.", model=model, tools=[get_weather],
                      model_settings=ModelSettings(tool_choice="required", temperature=1.0, max_tokens=200,
                                                   parallel_tool_calls=False))
        try:
            return await Runner.run(agent, ASK, max_turns=4)  # the choice resets to auto after a call
        finally:
            await client.close()

    result = asyncio.run(main())
    assert calls and calls[0] in ("Paris", "Rome")
    assert isinstance(result.final_output, str)
    items = [item.type for item in result.new_items]
    assert items[:2] == ["tool_call_item", "tool_call_output_item"] and items[-1] == "message_output_item"
    assert json.loads(result.new_items[0].raw_item.arguments) == {"city": calls[0]}
