"""Embedding models in the pool, /v1/embeddings, and all-MiniLM-L6-v2 against sentence-transformers."""

import asyncio
import base64
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest
from helpers import wait_for
from test_server import post

from mlx_manager_nb import embeddings
from mlx_manager_nb.server import serve

TEXTS = ["cats", "The capital of France is Paris.", "a dog barks at night and the cat sleeps all day long", "0 1 2"]
REFERENCE = Path(__file__).parent / "fixtures" / "minilm_reference.npz"


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory):
    from tiny_bert import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert") / "tiny-bert")


@pytest.fixture
def pool(pool, tiny_bert_path):
    """The shared tiny chat pool, with a tiny BERT beside it as ``bert``."""
    pool.load(tiny_bert_path, alias="bert")
    return pool


def count_passes(monkeypatch) -> list[int]:
    """Record the batch size of every forward pass."""
    sizes = []
    forward = embeddings._forward

    def counted(model, seqs):
        sizes.append(len(seqs))
        return forward(model, seqs)

    monkeypatch.setattr(embeddings, "_forward", counted)
    return sizes


def hold_engine(pool) -> threading.Event:
    """Keep the engine thread busy until the returned event is set, so that callers pile up."""
    release = threading.Event()
    pool.engine.run(release.wait)
    return release


# -- the pool ---------------------------------------------------------------------------------


def test_kind_shapes_and_normalization(pool):
    kinds = {m.alias: (m.kind, m.context_length) for m in pool.models()}
    assert kinds == {"tiny": ("chat", 512), "bert": ("embedding", 32)}
    one = pool.embed(TEXTS[1], model="bert")
    many = pool.embed(TEXTS, model="bert")
    assert one.shape == (32,) and many.shape == (4, 32) and many.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(many, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(many[1], one, atol=1e-5)  # padded inside a batch or alone: the same vector
    assert pool.embed(TEXTS).shape == (4, 32)  # no model named: the last used embedding model


def test_kinds_refuse_each_other(pool):
    with pytest.raises(ValueError, match="'tiny' is a chat model"):
        pool.embed("hi", model="tiny")
    with pytest.raises(ValueError, match="'bert' is an embedding model"):
        pool.chat([{"role": "user", "content": "hi"}], model="bert")
    with pytest.raises(ValueError, match="embedding model"):
        pool.count_tokens(prompt="hi", model="bert")
    pool.embed("hi", model="bert")  # the last used model is an embedding one, yet chat finds the chat model
    assert pool.chat([{"role": "user", "content": "hi"}], max_tokens=2).usage.completion_tokens <= 2


def test_token_ids_are_the_models_own(pool):
    ids = pool.engine.runner(pool.find("bert").name).tokenizer.encode(TEXTS[2]).ids
    np.testing.assert_allclose(pool.embed(ids, model="bert"), pool.embed(TEXTS[2], model="bert"), atol=1e-6)
    assert pool.embed([ids, ids[:3]], model="bert").shape == (2, 32)
    with pytest.raises(ValueError, match=r"outside .* vocabulary"):
        pool.embed([[1, 2, 100000]], model="bert")


@pytest.mark.parametrize("bad, match", [
    ([], "non-empty"), ("", "empty string"), (["ok", ""], r"input\[1\]' is an empty string"),
    (["ok", 3], r"input\[1\]' must be"), (["ok", [1, 2]], r"input\[1\]' must be"), ([[]], r"input\[0\]"),
    (["x"] * 2049, "2049 items; at most 2048"), (["x"] * 10_000, "at most 2048"), ({"a": 1}, "non-empty"),
])
def test_bad_inputs(pool, bad, match):
    with pytest.raises(ValueError, match=match):
        pool.embed(bad, model="bert")


def test_long_texts_refused_or_truncated(pool):
    long = "cats and dogs " * 30
    with pytest.raises(ValueError, match=r"at most 32.*truncate=True"):
        pool.embed(long, model="bert")
    cut = pool.embed(long, model="bert", truncate=True)
    runner = pool.engine.runner(pool.find("bert").name)
    ids = runner.tokenizer.encode(long).ids
    same = pool.embed(ids[:31] + ids[-1:], model="bert")  # [CLS] + 30 tokens + [SEP]
    np.testing.assert_allclose(cut, same, atol=1e-6)


def test_matryoshka_dimensions(pool):
    full = pool.embed(TEXTS, model="bert")
    short = pool.embed(TEXTS, model="bert", dimensions=8)
    prefix = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(short, prefix, atol=1e-5)
    assert pool.embed(TEXTS, model="bert", dimensions=32).shape == (4, 32)
    with pytest.raises(ValueError, match="'dimensions' must be one of 8, 16, 32"):
        pool.embed(TEXTS, model="bert", dimensions=12)


def test_concurrent_callers_share_forward_passes(pool, monkeypatch):
    texts = [" ".join(["cat"] * (1 + i % 25)) + f" {i}" for i in range(64)]
    alone = {t: pool.embed(t, model="bert") for t in texts}
    sizes = count_passes(monkeypatch)
    release = hold_engine(pool)
    results: dict[str, np.ndarray] = {}
    threads = [threading.Thread(target=lambda t=t: results.__setitem__(t, pool.embed(t, model="bert")))
               for t in texts]
    for t in threads:
        t.start()
    queue = pool.engine.runner(pool.find("bert").name).embed_queue
    while len(queue.pending) < len(texts):
        threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join()
    assert sum(sizes) == 64 and len(sizes) <= 4, sizes  # 64 callers, a few length buckets
    for t in texts:
        np.testing.assert_allclose(results[t], alone[t], atol=1e-5)


def test_buckets_limit_padding_and_batch_tokens():
    groups = embeddings._buckets([10, 3, 9, 200, 4, 5])
    assert groups == [[3], [0, 2, 5], [4, 1]]
    big = embeddings._buckets([100] * 200)
    assert all(len(g) * 100 <= embeddings.BATCH_TOKENS for g in big) and sum(map(len, big)) == 200


def test_aembed_does_not_block_the_loop(pool):
    async def main():
        release = hold_engine(pool)
        task = asyncio.ensure_future(pool.aembed(TEXTS, model="bert"))
        ticks = 0
        while ticks < 5:  # the loop runs while the engine is busy
            await asyncio.sleep(0.01)
            ticks += 1
        assert not task.done()
        release.set()
        return await task

    assert asyncio.run(main()).shape == (4, 32)


def test_a_cancelled_caller_does_not_disturb_the_others(pool):
    async def main():
        release = hold_engine(pool)
        gone = asyncio.ensure_future(pool.aembed(TEXTS, model="bert"))
        kept = asyncio.ensure_future(pool.aembed(TEXTS[:2], model="bert"))
        await asyncio.sleep(0.2)
        gone.cancel()
        release.set()
        return await kept

    assert asyncio.run(main()).shape == (2, 32)
    assert pool.embed("cats", model="bert").shape == (32,)
    assert all(m.in_flight == 0 for m in pool.models())


def test_a_client_that_disconnects_stops_its_batch_and_leaves_a_cancelled_row(server, pool, audit, monkeypatch):
    from mlx_manager_nb import slices

    monkeypatch.setattr(slices, "IDLE_SLICE", 0.005)  # slices of a few rows: the batch takes many passes
    passes = count_passes(monkeypatch)
    body = json.dumps({"model": "bert", "input": [[5] * 30] * 2048}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n" % len(body) + body)
        assert wait_for(lambda: len(passes) >= 2)  # the batch runs; then its client goes away

    def rows():
        audit.flush()
        return [r for r in audit.query(limit=5) if r["endpoint"] == "/v1/embeddings"]

    assert wait_for(rows) and rows()[0]["status"] == "cancelled"
    done = len(passes)
    time.sleep(0.3)
    assert len(passes) == done and sum(passes) < 2048  # no pass ran for it once it was cancelled
    assert pool.embed("cats", model="bert").shape == (32,)  # the model still embeds
    assert all(m.in_flight == 0 for m in pool.models())


def test_audit_rows_and_in_flight(pool, audit):
    pool.embed(TEXTS, model="bert", meta={"id": "emb-1"})
    with pytest.raises(ValueError):
        pool.embed("", model="bert", meta={"id": "emb-2"})
    audit.flush()
    rows = {r["id"]: r for r in audit.query(limit=10)}
    ok, bad = rows["emb-1"], rows["emb-2"]
    assert ok["endpoint"] == "pool.embed" and ok["status"] == "ok" and ok["prompt_tokens"] > len(TEXTS)
    assert ok["duration"] > 0 and ok["model"] == pool.find("bert").name
    assert bad["status"] == "error" and bad["error_type"] == "InvalidParameterError"
    assert all(m.in_flight == 0 for m in pool.models())
    with pytest.raises(ValueError, match="meta"):  # a bad meta is refused with its row too, as for chats
        pool.embed("cats", model="bert", meta={"no_such_field": 1})
    audit.flush()
    assert len(audit.query(limit=10)) == 3 and audit.query(limit=1)[0]["error_type"] == "InvalidParameterError"


def test_embedding_models_share_lru_and_pins(make_pool, tiny_bert_path, tiny_model_path):
    p = make_pool(max_models=1, keep_alive=None)
    p.load(tiny_model_path, alias="tiny")
    p.load(tiny_bert_path, alias="bert")  # evicts the idle chat model
    assert [m.alias for m in p.models()] == ["bert"]
    p.pin("bert")
    with pytest.raises(Exception, match="Pool full"):
        p.load(tiny_model_path, alias="tiny")
    p.unload("bert")
    with pytest.raises(Exception, match="not loaded"):
        p.embed("hi", model="bert")


# -- /v1/embeddings ---------------------------------------------------------------------------


def test_openai_sdk_float_and_base64(server, pool):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    expected = pool.embed(TEXTS, model="bert")
    as_b64 = client.embeddings.create(model="bert", input=TEXTS)  # the SDK asks for base64 by default
    as_float = client.embeddings.create(model="bert", input=TEXTS, encoding_format="float")
    for r in (as_b64, as_float):
        np.testing.assert_allclose(np.array([d.embedding for d in r.data]), expected, atol=1e-6)
        assert [d.index for d in r.data] == [0, 1, 2, 3] and r.model == "bert"
        assert r.usage.prompt_tokens == r.usage.total_tokens > len(TEXTS)
    one = client.embeddings.create(model="bert", input=TEXTS[0], dimensions=16, encoding_format="float")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 16


def test_raw_base64_is_little_endian_float32(server, pool):
    status, _, body = post(server.url + "/v1/embeddings", {"model": "bert", "input": "cats",
                                                            "encoding_format": "base64"})
    assert status == 200
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, pool.embed("cats", model="bert"), atol=1e-7)


def test_token_id_inputs_over_http(server, pool):
    ids = pool.engine.runner(pool.find("bert").name).tokenizer.encode("cats").ids
    for given, n in ((ids, 1), ([ids, ids], 2)):
        status, _, body = post(server.url + "/v1/embeddings", {"model": "bert", "input": given})
        assert status == 200 and len(body["data"]) == n
        assert body["usage"]["prompt_tokens"] == n * len(ids)
        np.testing.assert_allclose(body["data"][0]["embedding"], pool.embed("cats", model="bert"), atol=1e-6)


@pytest.mark.parametrize("body, param, match", [
    ({"input": []}, "input", "non-empty"),
    ({"input": ""}, "input", "empty string"),
    ({"input": ["a", 1]}, "input", r"input\[1\]"),
    ({"input": ["a"] * 10_000}, "input", "at most 2048"),
    ({"input": "cats " * 40}, "input", "at most 32"),
    ({"input": 3}, "input", "str/list"),
    ({}, "input", "'input' is required"),
    ({"input": "a", "model": "tiny"}, "model", "'tiny' is a chat model"),
    ({"input": "a", "dimensions": 5}, "dimensions", "'dimensions' must be one of"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", "float, base64"),
])
def test_bad_requests(server, audit, body, param, match):
    status, headers, out = post(server.url + "/v1/embeddings", {"model": "bert", **body})
    assert status == 400, out
    assert out["error"]["param"] == param and out["error"]["type"] == "invalid_request_error"
    assert re.search(match, out["error"]["message"]), out
    audit.flush()
    row = audit.query(limit=1)[0]
    assert row["id"] == headers["x-request-id"] and row["status"] == "error" and row["http_status"] == 400


def test_embedding_model_named_for_chat(server):
    status, _, out = post(server.url + "/v1/chat/completions",
                          {"model": "bert", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "'bert' is an embedding model" in out["error"]["message"]


def test_the_listing_names_every_model_the_server_answers_to(make_pool, tiny_bert_path):
    import shutil

    from mlx_manager_nb import store
    from mlx_manager_nb.demo_embed import DEMO_EMBED_NAME

    shutil.copytree(tiny_bert_path, store.models_dir() / DEMO_EMBED_NAME)  # where demo-embed is imported to
    p = make_pool(keep_alive=None)
    p.load("demo-embed")  # as `serve --model demo-embed` does
    s = serve(p, port=0, mode="thread", auto_load=False)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        listed = client.models.list().data
        assert {m.id for m in listed} == {"demo-embed", DEMO_EMBED_NAME}
        assert {m.model_extra["root"] for m in listed} == {DEMO_EMBED_NAME}  # one model, under two names
        for m in listed:
            assert client.embeddings.create(model=m.id, input="hi").data[0].embedding
    finally:
        s.stop(drain=0)


def test_http_audit_row(server, audit):
    status, headers, body = post(server.url + "/v1/embeddings", {"model": "bert", "input": TEXTS})
    assert status == 200
    audit.flush()
    row = next(r for r in audit.query(limit=5) if r["id"] == headers["x-request-id"])
    assert row["endpoint"] == "/v1/embeddings" and row["protocol"] == "openai" and row["status"] == "ok"
    assert row["prompt_tokens"] == body["usage"]["prompt_tokens"] and row["duration"] > 0


# -- all-MiniLM-L6-v2 (demo-embed) against sentence-transformers --------------------------------


@pytest.fixture(scope="session")
def embed_home(tmp_path_factory):
    """A store home holding the real demo embedding model, fetched and imported once per session."""
    from mlx_manager_nb.demo_embed import ensure_demo_embed

    home = tmp_path_factory.mktemp("embed-home")
    old = os.environ.get("MLX_NB_HOME")
    os.environ["MLX_NB_HOME"] = str(home)
    try:
        ensure_demo_embed()
    finally:
        if old is None:
            del os.environ["MLX_NB_HOME"]
        else:
            os.environ["MLX_NB_HOME"] = old
    return home


@pytest.fixture
def minilm(make_pool, embed_home, monkeypatch):
    monkeypatch.setenv("MLX_NB_HOME", str(embed_home))
    p = make_pool(keep_alive=None)
    info = p.load("demo-embed")
    assert info.kind == "embedding" and info.context_length == 256
    return p


def reference():
    ref = np.load(REFERENCE)
    vectors = ref["vectors"].astype(np.float32)
    return [str(s) for s in ref["sentences"]], vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm):
    sentences, expected = reference()
    batched = minilm.embed(sentences, model="demo-embed", truncate=True)  # one text is over 256 tokens
    alone = np.stack([minilm.embed(s, model="demo-embed", truncate=True) for s in sentences])
    for got in (batched, alone):
        cosines = (got * expected).sum(axis=1)
        assert cosines.min() >= 0.999, cosines
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1, rtol=1e-5)


@pytest.mark.slow
def test_minilm_same_vectors_in_a_batch_of_64_callers(minilm, monkeypatch):
    sentences, expected = reference()
    texts = [sentences[i % len(sentences)] if i < len(sentences) else f"{sentences[i % 20][: 5 + i]} #{i}"
             for i in range(64)]
    alone = [minilm.embed(t, model="demo-embed", truncate=True) for t in texts]
    sizes = count_passes(monkeypatch)

    async def callers():
        release = hold_engine(minilm)
        tasks = [asyncio.ensure_future(minilm.aembed(t, model="demo-embed", truncate=True)) for t in texts]
        queue = minilm.engine.runner(minilm.find("demo-embed").name).embed_queue
        while len(queue.pending) < len(texts):
            await asyncio.sleep(0.01)
        release.set()
        return await asyncio.gather(*tasks)

    together = asyncio.run(callers())
    assert len(sizes) < 64 and sum(sizes) == 64, sizes
    for a, b in zip(alone, together, strict=False):
        assert float(a @ b) >= 0.99999
    assert min(float(together[i] @ expected[i]) for i in range(20)) >= 0.999


@pytest.mark.slow
def test_minilm_over_http_with_the_openai_sdk(minilm):
    s = serve(minilm, port=0, mode="thread")
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused")
        sentences, expected = reference()
        r = client.embeddings.create(model="demo-embed", input=sentences[:10])
        got = np.array([d.embedding for d in r.data])
        assert ((got * expected[:10]).sum(axis=1) >= 0.999).all()
        with pytest.raises(openai.BadRequestError, match="dimensions"):
            client.embeddings.create(model="demo-embed", input="hi", dimensions=128)
        assert len(client.embeddings.create(model="demo-embed", input="hi", dimensions=384).data[0].embedding) == 384
        with pytest.raises(openai.BadRequestError, match="at most 256"):
            client.embeddings.create(model="demo-embed", input=sentences[14])
    finally:
        s.stop(drain=0)
    assert json.loads(json.dumps(r.usage.model_dump()))["prompt_tokens"] > 10


# -- libraries built on the OpenAI protocol (skipped where not installed; not in the test extra) ------


def test_langchain_openai_embeddings(server, pool):
    lc = pytest.importorskip("langchain_openai")
    # By default langchain sends tiktoken ids, which mean nothing to a non-OpenAI model (and need
    # tiktoken's files from the network): its docs say to turn that off for OpenAI-compatible servers.
    client = lc.OpenAIEmbeddings(model="bert", base_url=server.url + "/v1", api_key="unused",
                                 check_embedding_ctx_length=False)
    np.testing.assert_allclose(client.embed_documents(TEXTS), pool.embed(TEXTS, model="bert"), atol=1e-6)
    np.testing.assert_allclose(client.embed_query(TEXTS[0]), pool.embed(TEXTS[0], model="bert"), atol=1e-6)


def test_litellm_embedding(server, pool):
    litellm = pytest.importorskip("litellm")
    r = litellm.embedding(model="openai/bert", input=TEXTS, api_base=server.url + "/v1", api_key="unused")
    got = np.array([d["embedding"] for d in r.data])
    np.testing.assert_allclose(got, pool.embed(TEXTS, model="bert"), atol=1e-6)
    assert r.usage.prompt_tokens > len(TEXTS)


def test_the_pool_panel_shows_each_models_kind(pool):
    from mlx_manager_nb.widgets import pool_panel

    cells = re.findall(r"<td[^>]*>([^<]*)</td>", pool_panel(pool).parts.table.value)
    assert cells[cells.index("bert") + 1] == "embedding" and cells[cells.index("tiny") + 1] == "chat"


def test_hostile_embedding_requests_are_400s_beside_bystander_streams(server, pool):
    from test_hostile import post_raw, with_bystanders

    url = server.url + "/v1/embeddings"
    huge = json.dumps({"model": "bert", "input": ["many words " * 20] * 10_000}).encode()
    assert with_bystanders(server, pool, lambda http: post_raw(http, url, huge))[0] == 400
    surrogate = b'{"model": "bert", "input": ["fine", "bad \\ud800"]}'
    status, answer = with_bystanders(server, pool, lambda http: post_raw(http, url, surrogate))
    assert status == 400 and answer["error"]["param"] == "input[1]"
