"""Structured output by grammar-constrained decoding: on the tiny random-weight model the text
still parses and matches the schema, because the grammar allows nothing else."""

import threading
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, ConfigDict, Field

from mlx_manager_nb.constraints import closed_schema
from mlx_manager_nb.errors import InvalidParameterError
from mlx_manager_nb.model_pool import Pool

ASK = [{"role": "user", "content": "Describe an order."}]


class Item(BaseModel):
    sku: str = Field(max_length=8)  # bounded, so a random model ends within max_tokens
    qty: int = Field(ge=1, le=99)
    tags: list[Literal["new", "sale", "gift"]] = Field(max_length=3)


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=10)
    zip: str = Field(pattern=r"^[0-9]{5}$")


class Order(BaseModel):
    customer: str = Field(max_length=10)
    status: Literal["new", "paid", "shipped"]
    address: Address
    items: list[Item] = Field(min_length=1, max_length=3)
    note: str | None = Field(default=None, max_length=10)


NESTED = {  # the same kind of schema as a dict: nested objects, arrays, enums, required fields
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "kind": {"enum": ["a", "b", "c"]},
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                   "y": {"type": "number", "minimum": 0, "maximum": 1}},
                  "required": ["x", "y"], "additionalProperties": False},
        "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4},
    },
    "required": ["name", "kind", "point", "flags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def pool(tiny_module_pool):
    return tiny_module_pool


def test_twenty_generations_at_temperature_1_all_match_a_pydantic_schema(pool):
    for seed in range(20):
        r = pool.chat(ASK, schema=Order, temperature=1.0, seed=seed, max_tokens=300)
        assert r.finish_reason == "stop", r.text
        assert isinstance(r.parsed, Order)
        assert Order.model_validate_json(r.text) == r.parsed
        assert r.constrained


def test_twenty_generations_at_temperature_1_all_match_a_dict_schema(pool):
    for seed in range(20):
        r = pool.chat(ASK, schema=NESTED, temperature=1.0, seed=seed, max_tokens=200)
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(r.parsed, NESTED)


OPEN = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}}


def test_objects_a_schema_leaves_open_are_generated_without_extra_keys(pool):
    # extra keys still match an open schema; generating them only lets a weak model ramble on
    for seed in range(10):
        r = pool.chat(ASK, schema=OPEN, temperature=1.0, seed=seed, max_tokens=100)
        assert r.finish_reason == "stop" and set(r.parsed) <= {"a"}, r.text


def _obj(**props):
    return {"type": "object", "properties": props}


def test_closing_a_schema_narrows_only_where_that_keeps_its_meaning():
    schema = {"type": "object", "properties": {
        "default": _obj(x={}),  # a property's name, not the keyword: closed
        "c": {"const": _obj()},  # a value: left as it is
        "any": {"anyOf": [_obj(y={}), {"type": "string"}]},
        "said": {**_obj(z={}), "additionalProperties": {"type": "integer"}},
        "merged": {**_obj(p={}), "allOf": [_obj(q={})]},  # allOf brings keys: open
        "elsewhere": {**_obj(p={}), "required": ["q"]},  # a required key outside properties: open
        "negated": {"not": _obj(n={})},  # closing under not would widen what passes
    }}
    closed = closed_schema(schema)["properties"]
    assert closed["default"]["additionalProperties"] is False
    assert closed["c"] == schema["properties"]["c"]
    assert closed["any"]["anyOf"][0]["additionalProperties"] is False
    assert closed["said"]["additionalProperties"] == {"type": "integer"}
    for name in ("merged", "elsewhere", "negated"):
        assert closed[name] == schema["properties"][name], name


def test_any_json_object_through_openai_response_format(pool):
    r = pool.chat(ASK, response_format={"type": "json_object"}, temperature=0.5, seed=1, max_tokens=300)
    if r.finish_reason == "stop":
        assert isinstance(r.parsed, dict)
    else:  # an unbounded object from a random model may run out of tokens; whatever came is valid so far
        assert r.finish_reason == "length" and r.text.startswith("{")
    r = pool.chat(ASK, response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": NESTED}},
                  temperature=1.0, seed=2, max_tokens=200)
    jsonschema.validate(r.parsed, NESTED)


def test_constrained_and_free_requests_share_a_batch(pool):
    free_alone = pool.chat(ASK, temperature=0, max_tokens=40).text
    results = {}

    def run(key, **kw):
        results[key] = pool.chat(ASK, max_tokens=200 if "schema" in kw else 40, **kw)

    threads = [threading.Thread(target=run, args=(f"c{i}",), kwargs=dict(schema=NESTED, temperature=1.0, seed=i))
               for i in range(4)]
    threads += [threading.Thread(target=run, args=(f"f{i}",), kwargs=dict(temperature=0)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        jsonschema.validate(results[f"c{i}"].parsed, NESTED)
        assert results[f"f{i}"].text == free_alone  # the constraints did not leak into the free rows
        assert not results[f"f{i}"].constrained


def test_streaming_a_schema_answer(pool):
    s = pool.chat(ASK, schema=NESTED, temperature=1.0, seed=3, max_tokens=200, stream=True)
    text = "".join(s)
    assert text == s.result.text and s.result.parsed == __import__("json").loads(text)


def test_compiled_grammars_are_cached_per_model(pool):
    from mlx_manager_nb.constraints import _grammars, json_grammar

    tokenizer = pool.engine.runner("tiny-llama").tokenizer
    pool.chat(ASK, schema=NESTED, max_tokens=200)
    assert json_grammar(NESTED, "schema") in _grammars(tokenizer).matchers


@pytest.mark.parametrize("schema, field", [
    ({"type": "nonsense"}, "schema"),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}, "schema"),
    ("not a schema", "schema"),
])
def test_a_schema_that_cannot_be_compiled_names_the_field(pool, schema, field):
    with pytest.raises(InvalidParameterError) as caught:
        pool.chat(ASK, schema=schema)
    assert caught.value.param == field


def test_response_format_errors_name_response_format(pool):
    with pytest.raises(InvalidParameterError) as caught:
        pool.chat(ASK, response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}})
    assert caught.value.param.startswith("response_format")
    with pytest.raises(InvalidParameterError, match=r"response_format\.type"):
        pool.chat(ASK, response_format={"type": "xml"})


def test_audit_rows_record_constrained_output(pool, audit):
    pool.audit = audit
    try:
        pool.chat(ASK, schema=NESTED, temperature=1.0, seed=4, max_tokens=200)
        pool.chat(ASK, max_tokens=4)
        audit.flush()
        rows = sorted(audit.query(), key=lambda r: r["started_at"])
        assert [bool(r["constrained"]) for r in rows] == [True, False]
        assert [r["tool_calls"] for r in rows] == [0, 0]
    finally:
        pool.audit = None


@pytest.mark.slow
def test_the_demo_model_returns_a_parsed_object(demo_home, monkeypatch):
    monkeypatch.setenv("MLX_NB_HOME", str(demo_home))

    class City(BaseModel):
        name: str
        country: str
        continent: Literal["Africa", "America", "Asia", "Europe", "Oceania"]
        is_capital: bool

    pool = Pool(keep_alive=None)
    try:
        pool.load("demo")
        r = pool.chat([{"role": "user", "content": "Describe Paris as JSON."}], schema=City, temperature=0,
                      max_tokens=100)
        assert isinstance(r.parsed, City), r.text
        assert "Paris" in r.parsed.name
    finally:
        pool.close()
