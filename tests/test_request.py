"""The protocol-neutral request: each adapter's errors (mid-stream ones with their real kind, seen by
the official clients), the one name resolver with its named references, and errors carrying their
status."""

import anthropic
import openai
import pytest

from mlx_manager_nb import store
from mlx_manager_nb.errors import (
    ApiError,
    ContextLengthError,
    EngineError,
    InvalidParameterError,
    ModelNotFoundError,
    PoolFullError,
    kind_of,
    status_of,
)
from mlx_manager_nb.request import RequestContext, python_request
from mlx_manager_nb.server import serve
from mlx_manager_nb.server.anthropic_api import ADAPTER as ANTHROPIC
from mlx_manager_nb.server.openai_api import ADAPTER as OPENAI
from mlx_manager_nb.server.responses_api import ADAPTER as RESPONSES

HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def own(make_pool, tiny_model_path):
    """A server over a pool of its own, whose model a test may unload."""
    pool = make_pool(keep_alive=None)
    pool.load(tiny_model_path, alias="tiny")
    server = serve(pool, port=0, mode="thread")
    yield pool, server
    server.stop(drain=0)


def _no_eos(pool):
    return {str(pool.runner(pool.find("tiny").name).tokenizer.eos_token_id): -100}


def _unload_after_first(pool, events):
    """Iterate ``events``, unloading the model once the first has arrived."""
    for i, _ in enumerate(events):
        if i == 1:
            pool.unload("tiny")


# -- a failure in the middle of a stream carries its kind, in each protocol's terms ---------------------


def test_openai_mid_stream_failure_says_what_failed(own, audit):
    pool, server = own
    pool.audit = audit
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="tiny", messages=HI, stream=True, max_tokens=400,
                                            temperature=0, logit_bias=_no_eos(pool))
    with pytest.raises(openai.APIError) as failed:
        _unload_after_first(pool, stream)
    assert failed.value.body["code"] == "model_not_found"  # not a generic server_error
    assert failed.value.body["type"] == "invalid_request_error" and "unloaded" in failed.value.message
    audit.flush()
    row = audit.query(limit=1)[0]
    assert row["status"] == "error" and row["http_status"] == 200  # the stream had answered 200


def test_anthropic_mid_stream_failure_says_what_failed(own):
    pool, server = own
    client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as failed, \
            client.messages.stream(model="tiny", messages=HI, max_tokens=400) as stream:
        _unload_after_first(pool, stream)
    assert failed.value.body["error"]["type"] == "not_found_error"  # not a generic api_error
    assert "unloaded" in failed.value.body["error"]["message"]


def test_responses_mid_stream_failure_is_a_failed_response_with_the_message(own):
    pool, server = own
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    events = []
    stream = client.responses.create(model="tiny", input="Hi", stream=True, max_output_tokens=400, temperature=0)
    for i, event in enumerate(stream):
        events.append(event)
        if i == 3:
            pool.unload("tiny")
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert "unloaded" in failed.response.error.message and failed.response.error.code == "server_error"


def test_each_adapter_names_a_kind_in_its_own_terms():
    busy = PoolFullError("Pool full")
    assert (OPENAI.error(busy).status, ANTHROPIC.error(busy).status) == (503, 529)
    assert OPENAI.error_body(OPENAI.error(busy))["error"]["code"] == "overloaded"
    assert ANTHROPIC.error_body(ANTHROPIC.error(busy))["error"]["type"] == "overloaded_error"
    long = ContextLengthError("messages", "This model's maximum context length is 512 tokens", 600, 512)
    assert OPENAI.error(long).param == "messages" and RESPONSES.error(long).param == "input"
    assert ANTHROPIC.error(long).message == "prompt is too long: 600 tokens > 512 maximum"
    over = ContextLengthError("max_tokens", "max_tokens=600 plus the prompt exceeds it", 700, 512)
    assert RESPONSES.error(over).param == "max_output_tokens" and OPENAI.error(over).param == "max_tokens"
    assert OPENAI.error(EngineError("boom")).message == "Internal error: EngineError: boom"


# -- errors carry their status and kind -----------------------------------------------------------------


@pytest.mark.parametrize("error, status, kind", [
    (InvalidParameterError("temperature", "bad"), 400, "invalid_request"),
    (ContextLengthError("messages", "long", 9, 8), 400, "context_length"),
    (ModelNotFoundError("none"), 404, "not_found"),
    (PoolFullError("full"), 503, "overloaded"),
    (EngineError("boom"), 500, "api"),
    (ApiError(415, "json please", "media_type"), 415, "media_type"),
    (ValueError("plain"), 400, "invalid_request"),
    (RuntimeError("plain"), 500, "api"),
])
def test_errors_carry_their_status_and_kind(error, status, kind):
    assert (status_of(error), kind_of(error)) == (status, kind)


def test_a_python_caller_gets_no_http_status_in_its_audit_row(pool, audit):
    pool.audit = audit
    with pytest.raises(InvalidParameterError):
        pool.chat(HI, model="tiny", temperature=-1, meta=RequestContext(source="magic"))
    with pytest.raises(InvalidParameterError, match="meta: unknown field"):
        pool.chat(HI, model="tiny", meta={"error_status": lambda e: 400})
    audit.flush()
    rows = audit.query()
    assert [r["http_status"] for r in rows] == [None, None] and rows[-1]["source"] == "magic"


# -- one name resolver -----------------------------------------------------------------------------------


def test_one_resolver_answers_to_name_alias_reference_and_named_reference(make_pool, tiny_model_path, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setitem(store.named(), "favourite", store.Named(tiny_model_path.name, lambda progress: tiny_model_path))
    pool = make_pool(keep_alive=None)
    info = pool.load(tiny_model_path, alias="t")
    for name in (info.name, "t", str(tiny_model_path), "favourite"):
        assert pool.lookup(name) == pool.find(name) and pool.find(name).name == info.name
        assert pool.is_loaded(name)
    assert pool.load("favourite").name == info.name  # already loaded: the same entry, not a second load
    assert len(pool.models()) == 1
    assert pool.pin("favourite").pinned and pool.unpin("t").pinned is False
    assert pool.lookup("nothing") is None and not pool.is_loaded("nothing")
    with pytest.raises(ModelNotFoundError):
        pool.unload("nothing")


def test_named_references_come_from_the_demo_modules():
    import mlx_manager_nb.demo as demo
    import mlx_manager_nb.demo_embed as demo_embed

    assert store.named_folder("demo") == demo.DEMO_NAME
    assert store.named_folder("demo-embed") == demo_embed.DEMO_EMBED_NAME
    assert store.named()["demo"].fetch is demo.ensure_demo and store.named_folder("tiny") is None


def test_a_fresh_process_resolves_demo_through_the_store_alone():
    """``store.resolve("demo")`` is the store's documented use: it must not depend on who imported what first
    (the scratch homes' import step runs just that in a new process)."""
    import subprocess
    import sys

    code = ("import sys\nfrom mlx_manager_nb import store\nassert 'mlx_manager_nb.demo' not in sys.modules\n"
            "print(store.named_folder('demo'), store.named_folder('demo-embed'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["smollm2-135m-instruct", "all-minilm-l6-v2"], done.stderr


def test_the_server_resolves_a_named_reference_to_a_model_loaded_by_path(make_pool, tiny_model_path, monkeypatch):
    monkeypatch.setitem(store.named(), "favourite", store.Named(tiny_model_path.name, lambda progress: tiny_model_path))
    pool = make_pool(keep_alive=None)
    pool.load(tiny_model_path)
    server = serve(pool, port=0, mode="thread", auto_load=False)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        assert "favourite" in [m.id for m in client.models.list()]
        reply = client.chat.completions.create(model="favourite", messages=HI, max_tokens=3)
        assert reply.model == "favourite" and reply.usage.completion_tokens == 3
    finally:
        server.stop(drain=0)


def test_a_completion_refuses_tools_and_schemas_instead_of_ignoring_them(pool):
    with pytest.raises(InvalidParameterError, match=r"schema is a parameter of pool\.chat"):
        pool.complete("Once", schema={"type": "object"}, max_tokens=2)
    with pytest.raises(InvalidParameterError, match=r"tools is a parameter of pool\.chat"):
        python_request(prompt="Once", tools=[])
    assert pool.complete("Once", max_tokens=2).usage.completion_tokens == 2


def test_a_parsed_request_runs_as_it_is(pool, audit):
    s = pool.stream(python_request(HI, max_tokens=3, temperature=0), "tiny",
                    RequestContext(source="script", endpoint="mine"))
    text = "".join(s)
    assert s.result is not None and s.result.usage.completion_tokens == 3 and text == s.result.text
    audit.flush()
    row = audit.query(limit=1)[0]
    assert (row["source"], row["endpoint"], row["protocol"]) == ("script", "mine", "python")
