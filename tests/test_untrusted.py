"""Untrusted work bounded: schemas over their caps are short 400s naming the field, a client's schema
checks run a few at a time and stop when it leaves, and a grammar whose masks cost too much fails
alone, while bystanders stream on unharmed."""

import asyncio
import json
import os
import sys
import threading
import time

import aiohttp
import openai
import pytest
from helpers import HI, with_bystanders

from mlx_manager_nb.constraints import Constraint

DRAFT4 = "http://json-schema.org/draft-04/schema#"


def _tool(i: int, schema: dict) -> dict:
    return {"type": "function", "function": {"name": f"f{i}", "parameters": schema}}


def _format(schema: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def _object(properties: dict, **extra) -> dict:
    return {"type": "object", "properties": properties, **extra}


async def post(url, body, local="127.0.0.1"):
    """POST ``body`` from the address ``local``: (status, answer, seconds)."""
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(local, 0))) as own, \
            own.post(url, json=body) as r:
        return r.status, await r.read(), time.perf_counter() - started


# -- caps: refused before any library sees the schema, in a short body naming the field -------------------------

MIXED = [i if i % 3 == 0 else f"s{i}" if i % 3 == 1 else {"k": i} for i in range(7_000)]  # unsortable: pairwise
CAPS = {
    "100,000-value enum": ({"tools": [_tool(0, _object({"a": {"enum": [f"value{i}" for i in range(100_000)]}}))],
                            "tool_choice": "required"}, "tools[0].function.parameters", "at most 1,000,000"),
    "60,000-property tool": ({"tools": [_tool(0, _object({f"p{i}": {"type": "string"} for i in range(60_000)}))]},
                             "tools[0].function.parameters", "bytes as JSON; at most 1,000,000"),
    "5,001 properties": (_format(_object({f"p{i}": {} for i in range(5_001)})),
                         "response_format.json_schema.schema", "5,001 properties; at most 5,000"),
    "12,000 properties over three tools": ({"tools": [_tool(i, _object({f"p{j}": {} for j in range(4_000)}))
                                                      for i in range(3)]},
                                           "tools[2].function.parameters", "12,000 properties together"),
    "7,000 mixed draft-04 enum values": (_format({"$schema": DRAFT4, **_object({"a": {"enum": MIXED}})}),
                                         "response_format.json_schema.schema", "7,000 enum"),
}


@pytest.mark.parametrize("extra,param,says", CAPS.values(), ids=CAPS.keys())
def test_schemas_over_a_cap_are_short_400s_naming_the_field_beside_bystanders(server, pool, extra, param, says):
    body = {"model": "tiny", "messages": HI, "max_tokens": 3, **extra}
    url = server.url + "/v1/chat/completions"
    status, answer, took = with_bystanders(server, pool, lambda http: post(url, body), n=2)
    assert status == 400 and len(answer) < 1_000, answer[:2_000]  # never the schema echoed back
    error = json.loads(answer)["error"]
    assert error["param"] == param and says in error["message"], error
    assert took < 5, took  # refused by counting, not by checking


OTHER_PROTOCOLS = {
    "anthropic tool": ("/v1/messages", {"model": "tiny", "max_tokens": 3, "messages": HI, "tools": [
        {"name": "f", "input_schema": _object({"a": {"enum": [f"value{i}" for i in range(100_000)]}})}]},
                       "tools.0.input_schema is 1,"),
    "responses format": ("/v1/responses", {"model": "tiny", "input": "Hi", "max_output_tokens": 3, "text": {"format": {
        "type": "json_schema", "name": "x", "schema": _object({f"p{i}": {} for i in range(5_001)})}}},
                         "text.format.schema has 5,001 properties"),
}


@pytest.mark.parametrize("path,body,says", OTHER_PROTOCOLS.values(), ids=OTHER_PROTOCOLS.keys())
def test_caps_hold_in_every_protocol(server, path, body, says):
    status, answer, _ = asyncio.run(post(server.url + path, body))
    assert status == 400 and len(answer) < 1_000 and says in answer.decode(), answer[:2_000]


def test_a_duplicate_in_a_large_mixed_enum_is_found_quickly_and_quoted_briefly(server):
    enum = [*MIXED[:4_000], {"k": 2}]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    started = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=3,
                                       **_format({"$schema": DRAFT4, **_object({"a": {"enum": enum}})}))
    assert time.perf_counter() - started < 5  # jsonschema alone compares unsortable values pairwise: seconds
    assert e.value.body["param"] == "response_format.json_schema.schema"
    assert "properties.a.enum holds {'k': 2} twice" in e.value.body["message"]
    assert len(e.value.response.text) < 1_000


@pytest.mark.parametrize("bound,shown", [(1e300, "1e+300"), (2**70, str(2**70)), (-(2**64), str(-(2**64)))])
def test_an_integer_bound_llguidance_cannot_take_is_a_400_naming_it(server, bound, shown):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x")
    schema = _object({"n": {"type": "integer", "minimum": bound}}, required=["n"])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=3, **_format(schema))
    assert e.value.body["param"] == "response_format.json_schema.schema"
    assert f"response_format.json_schema.schema.properties.n.minimum is {shown}" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # a value as large, anywhere
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=3,
                                       tools=[_tool(0, _object({"n": {"const": 2**70}}))], tool_choice="required")
    assert e.value.body["param"] == "tools[0].function.parameters"
    assert "tools[0].function.parameters.properties.n.const is" in e.value.body["message"]


# -- a client's checks: a few at a time, stopped when it leaves ---------------------------------------------------


def _heavy() -> dict:
    """A body whose checks take seconds: 128 tools, about the most properties a request may have."""
    return {"model": "tiny", "messages": HI, "max_tokens": 3, "tools": [
        _tool(i, _object({f"p{j}": {"type": "string", "enum": [f"v{i}-{j}-{k}" for k in range(5)]}
                          for j in range(78)})) for i in range(128)]}


SMALL = {"model": "tiny", "messages": HI, "max_tokens": 3, "temperature": 0,
         **_format(_object({"a": {"type": "integer", "minimum": 0, "maximum": 9}}, required=["a"]))}


def test_a_client_that_leaves_stops_its_checks_and_frees_its_place(server):
    url = server.url + "/v1/chat/completions"

    async def main():
        quiet = (await post(url, SMALL))[2]
        heavy = (await post(url, _heavy()))[2]
        # two heavy requests fill this client's places; it gives up on both, then asks something small
        gone = [asyncio.create_task(post(url, _heavy())) for _ in range(2)]
        await asyncio.sleep(0.3)
        for task in gone:
            task.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
        status, _, took = await post(url, SMALL)
        return quiet, heavy, status, took

    quiet, heavy, status, took = asyncio.run(main())
    assert status == 200
    # had the checks gone on, the small request would wait for a place behind them: most of `heavy`
    assert took < quiet + heavy / 2, (quiet, heavy, took)


def test_one_client_checks_at_most_two_requests_at_once(server):
    url = server.url + "/v1/chat/completions"

    async def main():
        alone = (await post(url, _heavy()))[2]
        flood = [asyncio.create_task(post(url, _heavy())) for _ in range(4)]
        await asyncio.sleep(min(1.0, alone / 4))  # all four sent, read and being checked (or waiting)
        other = await post(url, SMALL, local="127.0.0.2")  # another client: a place is free for it
        flooded = await asyncio.gather(*flood)
        return alone, other, flooded

    alone, (status, _, took), flooded = asyncio.run(main())
    # each checked whole, within its budget (llguidance may then find their grammar too large)
    assert all(s in (200, 400) and b"took more than" not in answer for s, answer, _ in flooded), flooded[0][:2]
    # had the four taken every worker, the other client would wait for one: most of a check (or more,
    # as four share the interpreter)
    assert status == 200 and took < alone / 2, (took, alone)


# -- grammar masks: computed together, each request within its own budget ----------------------------------------

NESTED = _object({"name": {"type": "string", "maxLength": 10}, "kind": {"enum": ["a", "b", "c"]},
                  "n": {"type": "integer", "minimum": 0, "maximum": 99}}, required=["name", "kind", "n"])


def test_masks_computed_together_give_each_request_the_text_it_gets_alone(pool):
    asks = [[{"role": "user", "content": f"Describe item {i}."}] for i in range(4)]
    alone = [pool.chat(ask, schema=NESTED, temperature=0, max_tokens=80).text for ask in asks]
    together: dict[int, str] = {}

    def run(i):
        together[i] = pool.chat(asks[i], schema=NESTED, temperature=0, max_tokens=80).text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=pool.chat, args=(HI,), kwargs={"max_tokens": 40}) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(4)] == alone
    assert all(json.loads(text)["kind"] in "abc" for text in alone)


def test_a_late_mask_sits_its_request_out_of_steps_without_holding_a_bystander_and_keeps_its_text(pool, monkeypatch):
    free = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    asks = [[{"role": "user", "content": f"Write note {i}."}] for i in range(2)]
    alone = [pool.chat(ask, schema=free, temperature=0, max_tokens=60).text for ask in asks]
    start = time.perf_counter()
    pool.chat(HI, max_tokens=40, temperature=0)
    quiet = time.perf_counter() - start
    compute = Constraint._compute_mask

    def slow(self):  # a grammar whose every mask takes 100 ms (waiting, not CPU: within its budget)
        time.sleep(0.1)
        return compute(self)

    monkeypatch.setattr(Constraint, "_compute_mask", slow)
    beside: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: beside.__setitem__(
        i, pool.chat(asks[i], schema=free, temperature=0, max_tokens=60).text)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # both decode, 60 tokens each: 6 s at least
    start = time.perf_counter()
    pool.chat(HI, max_tokens=40, temperature=0)
    took = time.perf_counter() - start
    for t in threads:
        t.join()
    assert [beside[0], beside[1]] == alone  # greedy: sitting steps out changes no token
    # had each step waited for the masks, the bystander's 40 steps would have taken 4 s at least
    assert took < quiet + 2, (took, quiet)


def test_a_late_mask_rejoins_where_the_prompt_cache_keeps_nothing(pool, monkeypatch):
    """With no room for a prompt cache (a KV budget the running sequence takes whole), a request whose masks
    are always late comes back from each sit-out as a prompt of its text so far, prefilled in the batch for a
    step before it samples: it is not parked again for the placeholder of the step before its sit-out."""
    free = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    ask = [{"role": "user", "content": "Write note 0."}]
    alone = pool.chat(ask, schema=free, temperature=0, max_tokens=12).text
    compute = Constraint._compute_mask

    def slow(self):  # every mask late (waiting, not CPU: within its budget)
        time.sleep(0.1)
        return compute(self)

    monkeypatch.setattr(Constraint, "_compute_mask", slow)
    monkeypatch.setattr(pool.engine.runner("tiny-llama"), "kv_budget", 1)  # the prompt cache keeps nothing
    late = pool.chat(ask, schema=free, temperature=0, max_tokens=12, timeout=20)
    assert late.finish_reason != "timeout", late.text  # before: parked again after every rejoin, for ever
    assert late.text == alone


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="each thread has its own priority on Linux")
def test_grammar_compiles_and_schema_checks_run_below_the_engines_priority(pool):
    from mlx_manager_nb.constraints import _compile_threads
    from mlx_manager_nb.priority import BACKGROUND_NICE
    from mlx_manager_nb.server.checks import _pool

    engine = pool.engine.run(threading.get_native_id).result()
    for threads in (_compile_threads, _pool):
        tid = threads.submit(threading.get_native_id).result()
        nice, engine_nice = os.getpriority(os.PRIO_PROCESS, tid), os.getpriority(os.PRIO_PROCESS, engine)
        assert nice == min(19, engine_nice + BACKGROUND_NICE), (nice, engine_nice)


@pytest.mark.parametrize("pattern", ["^(x{500}){500}$", "^(x{1000}){1000}$"])
def test_a_grammar_whose_masks_cost_too_much_fails_alone(server, pool, audit, pattern):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    costly = _format(_object({"a": {"type": "string", "pattern": pattern}}, required=["a"]))

    async def hostile(http):
        return await asyncio.to_thread(_fail, client, costly)

    message = with_bystanders(server, pool, hostile, n=2)
    assert "budget" in message or "grammar stopped" in message, message
    rows = [r for r in audit.query() if r["constrained"]]
    assert [r["status"] for r in rows] == ["error"], rows


def _fail(client, costly) -> str:
    """The error of a streamed request: an error event, or a 400 when its first mask is over budget."""
    with pytest.raises(openai.APIError) as e:
        for _ in client.chat.completions.create(model="tiny", messages=HI, max_tokens=400, stream=True, **costly):
            pass
    if isinstance(e.value, openai.BadRequestError):
        assert e.value.body["param"] == "response_format.json_schema.schema"
    return str(e.value)
