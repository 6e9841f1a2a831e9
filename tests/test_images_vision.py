"""Images end to end on a vision model, beside tests/test_vision.py (which sends one through every protocol
and %%chat --image): pool.chat's image values (a PIL image, an array, a path, bytes) and the panel's upload
give the greedy answer of the reference computation on the same pixels, with its audit row; a Responses
follow-up sends its stored image again; a text-only request streams beside an image request."""

import base64
import io
import json

import numpy as np
import openai
import pytest
from helpers import with_bystanders
from test_vision import QUESTION, chat, picture, reference
from tiny_vlm import build_tiny_vlm

from mlx_manager_nb.audit_log import AuditLog
from mlx_manager_nb.server import serve

pytest.importorskip("PIL")
N = 12  # tokens of each answer


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-vlm")


@pytest.fixture(scope="module")
def vision_pool(vlm_path, tiny_model_path, tmp_path_factory):
    from mlx_manager_nb.model_pool import Pool

    audit = AuditLog(tmp_path_factory.mktemp("audit") / "audit.db", log_content=True)
    pool = Pool(keep_alive=None, audit=audit)
    pool.image_splitting = True  # as test_vision's reference computes it (the processor's own setting)
    pool.load(vlm_path, alias="vlm")
    pool.load(tiny_model_path, alias="tiny")  # the bystanders' model (with_bystanders)
    yield pool
    pool.close()
    pool.engine.stop()
    audit.close()


@pytest.fixture(scope="module")
def vision_server(vision_pool):
    s = serve(vision_pool, port=0, mode="thread")
    yield s
    s.stop(drain=0)


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # lossless: the server decodes the very pixels of ``img``
    return buf.getvalue()


@pytest.fixture(scope="module")
def expected(vlm_path):
    img = picture(7)
    return img, png(img), reference(vlm_path, chat(QUESTION, img, max_tokens=N), N)


def test_pool_chat_takes_pil_arrays_paths_bytes_and_answers_as_the_reference(vision_pool, expected, tmp_path):
    img, data, answer = expected
    path = tmp_path / "p.png"
    path.write_bytes(data)
    for value in (img, np.asarray(img), path, str(path), data):
        r = vision_pool.chat([{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                           {"type": "image", "image": value}]}],
                             "vlm", max_tokens=N, temperature=0)
        assert r.text == answer, type(value)


def test_an_image_requests_audit_row_counts_its_images_and_describes_them(vision_pool, expected):
    _img, data, _answer = expected
    vision_pool.chat([{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                   {"type": "image", "image": data}]}], "vlm", max_tokens=N,
                     temperature=0, meta={"id": "req_" + "ab" * 16})
    audit = vision_pool.audit
    audit.flush()
    (row,) = audit.query(limit=1)
    assert row["status"] == "ok" and (row["images"], row["image_bytes"]) == (1, len(data))
    stored = audit._read("SELECT prompt FROM contents WHERE request_id = ?", [row["id"]])[0]["prompt"]
    assert base64.b64encode(data).decode()[:40] not in stored
    assert json.loads(stored)[0]["images"][0]["format"] == "PNG"


def test_a_text_stream_goes_on_beside_an_image_request_over_http(vision_server, vision_pool, expected):
    _img, data, answer = expected
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    body = {"model": "vlm", "max_tokens": N, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]}]}

    async def image_request(http):
        async with http.post(vision_server.url + "/v1/chat/completions", json=body) as r:
            return r.status, await r.json()

    vision_pool.default = "tiny"  # the bystanders' model, whose answer with_bystanders expects
    try:
        status, result = with_bystanders(vision_server, vision_pool, image_request, n=2)
    finally:
        vision_pool.default = None
    assert status == 200 and result["choices"][0]["message"]["content"] == answer


def test_the_panels_upload_is_answered_with_a_thumbnail_in_the_transcript(vision_pool, expected):
    from datetime import datetime, timezone

    from helpers import wait_for

    from mlx_manager_nb.widgets import chat_panel

    _img, data, answer = expected
    parts = chat_panel(vision_pool).parts
    parts.model.value = "tiny-vlm"  # the dropdown holds names
    parts.temperature.value, parts.max_tokens.value = 0.0, N
    parts.upload.value = ({"name": "p.png", "type": "image/png", "size": len(data), "content": memoryview(data),
                           "last_modified": datetime.now(timezone.utc)},)
    parts.prompt.value = QUESTION
    parts.send.click()
    assert wait_for(lambda: not parts.send.disabled and len(parts.history) == 2, timeout=60), parts.error.value
    assert parts.history[1]["content"] == answer and parts.upload.value == ()
    assert any("image/png" in o["data"] for o in parts.conversation.outputs)


def test_a_responses_follow_up_sends_the_stored_image_again(vision_server, expected):
    _, data, answer = expected
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    client = openai.OpenAI(base_url=vision_server.url + "/v1", api_key="unused", max_retries=0)
    content = [{"type": "input_text", "text": QUESTION}, {"type": "input_image", "image_url": url}]
    first = client.responses.create(model="vlm", max_output_tokens=N, temperature=0,
                                    input=[{"role": "user", "content": content}])
    assert first.output_text == answer
    items = client.responses.input_items.list(first.id).data
    assert items[0].content[1].type == "input_image" and items[0].content[1].image_url == url
    follow = client.responses.create(model="vlm", max_output_tokens=4, temperature=0, previous_response_id=first.id,
                                     input="And its colours?")
    assert follow.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_openai_detail_low_is_one_tile_and_high_the_processors_tiles(vision_server, vlm_path, expected):
    img, data, answer = expected
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    client = openai.OpenAI(base_url=vision_server.url + "/v1", api_key="unused", max_retries=0)

    def ask(detail):
        return client.chat.completions.create(model="vlm", max_tokens=N, temperature=0, messages=[{
            "role": "user", "content": [{"type": "text", "text": QUESTION},
                                        {"type": "image_url", "image_url": {"url": url, "detail": detail}}]}])

    low, high, auto = ask("low"), ask("high"), ask("auto")
    assert low.usage.prompt_tokens < high.usage.prompt_tokens == auto.usage.prompt_tokens  # the pool splits
    assert high.choices[0].message.content == answer
    assert low.choices[0].message.content == reference(vlm_path, chat(QUESTION, img, max_tokens=N), N,
                                                       splitting=False)
    content = [{"type": "input_text", "text": QUESTION}, {"type": "input_image", "image_url": url, "detail": "low"}]
    response = client.responses.create(model="vlm", max_output_tokens=N, temperature=0,
                                       input=[{"role": "user", "content": content}])
    assert response.usage.input_tokens == low.usage.prompt_tokens
    assert response.output_text == low.choices[0].message.content


def test_a_pool_that_cuts_no_images_gives_one_tile_whatever_the_detail(vlm_path):
    from dataclasses import replace

    from mlx_manager_nb import vision

    request = chat(QUESTION, picture(7), max_tokens=N)
    user = request.messages[0]

    def tokens(processor, detail):
        parts = (user.parts[0], replace(user.parts[1], detail=detail))
        return len(vision.prompt(processor, replace(request, messages=(replace(user, parts=parts),)))[0])

    uncut, cut = vision.read_processor(vlm_path, False), vision.read_processor(vlm_path, True)
    assert tokens(uncut, "high") == tokens(uncut, "auto") == tokens(uncut, "low") == tokens(cut, "low")
    assert tokens(cut, "high") == tokens(cut, "auto") > tokens(cut, "low")
