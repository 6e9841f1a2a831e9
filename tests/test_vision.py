"""Vision models in the pool: a tiny random-weight Idefics3 (SmolVLM) folder answers about images as the
reference computation does (processor, a NumPy vision tower, mlx-lm's llama fed the embeddings), alone and
batched; the prompt cache never gives one image's KV to another; the encode runs in slices beside a stream."""

import base64
import contextlib
import io
import itertools
import statistics
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from helpers import wait_for
from mlx_lm.generate import generate_step
from mlx_lm.models import llama
from mlx_lm.utils import load_tokenizer
from PIL import Image as PILImage
from tiny_vlm import build_tiny_vlm

from mlx_manager_nb import slices, vision
from mlx_manager_nb.errors import InvalidParameterError
from mlx_manager_nb.params import make_params
from mlx_manager_nb.request import ChatRequest, Image, Message, RequestContext, Text
from mlx_manager_nb.store import read_config

pytest.importorskip("PIL")
QUESTION = "What is in this image?"


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny-vlm")


@pytest.fixture(scope="module")
def vlm(vlm_path):
    from mlx_manager_nb.model_pool import Pool

    pool = Pool(keep_alive=None)
    pool.image_splitting = True  # the tiny model's tiles cost nothing: the path with several tiles is tested
    pool.load(vlm_path, alias="vlm")
    yield pool
    pool.close()


def picture(seed: int, size: tuple[int, int] = (100, 150)) -> PILImage.Image:
    return PILImage.fromarray((np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8))


def chat(*parts, max_tokens: int = 16) -> ChatRequest:
    """A one-turn chat request: PIL images and strings, in order (as the surfaces' parsers make them)."""
    typed = tuple(Image(p, 1000, f"digest-{id(p)}", f"messages[0].content[{i}]") if isinstance(p, PILImage.Image)
                  else Text(p) for i, p in enumerate(parts))
    return ChatRequest((Message("user", typed),), params=make_params(max_tokens=max_tokens, temperature=0))


def run(pool, request, context=None):
    stream = pool.stream(request, "vlm", context or RequestContext())
    text = "".join(stream)
    return text, stream.result


# -- the reference: Hugging Face's processor, a NumPy vision tower, mlx-lm's llama with input_embeddings --------


def _layer_norm(x, w, b, eps):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _tower(w, config, tile):
    """SigLIP on one (3, H, W) tile, then Idefics3's pixel shuffle and projection: (tokens, text hidden)."""
    v, prefix = config["vision_config"], "model.vision_model."
    p, d, heads, eps = v["patch_size"], v["hidden_size"], v["num_attention_heads"], v["layer_norm_eps"]
    c, hh, ww = tile.shape
    patches = tile.reshape(c, hh // p, p, ww // p, p).transpose(1, 3, 0, 2, 4).reshape(-1, c * p * p)
    conv = w[prefix + "embeddings.patch_embedding.weight"].reshape(d, -1)
    x = patches @ conv.T + w[prefix + "embeddings.patch_embedding.bias"]
    x = x + w[prefix + "embeddings.position_embedding.weight"][: len(x)]
    for i in range(v["num_hidden_layers"]):
        layer = f"{prefix}encoder.layers.{i}."

        def lin(name, t, layer=layer):
            return t @ w[layer + name + ".weight"].T + w[layer + name + ".bias"]

        h = _layer_norm(x, w[layer + "layer_norm1.weight"], w[layer + "layer_norm1.bias"], eps)
        q, k, vv = (lin(f"self_attn.{n}_proj", h).reshape(len(x), heads, -1).transpose(1, 0, 2) for n in "qkv")
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (scores / scores.sum(-1, keepdims=True)) @ vv
        x = x + lin("self_attn.out_proj", attn.transpose(1, 0, 2).reshape(len(x), d))
        h = _layer_norm(x, w[layer + "layer_norm2.weight"], w[layer + "layer_norm2.bias"], eps)
        x = x + lin("mlp.fc2", _gelu_tanh(lin("mlp.fc1", h)))
    x = _layer_norm(x, w[prefix + "post_layernorm.weight"], w[prefix + "post_layernorm.bias"], eps)
    s, side = config["scale_factor"], int(np.sqrt(len(x)))
    # pixel shuffle: each s x s block of patches, row by row, becomes one token of s*s*d features
    x = x.reshape(side // s, s, side // s, s, d).transpose(0, 2, 1, 3, 4).reshape(-1, s * s * d)
    return x @ w["model.connector.modality_projection.proj.weight"].T


def reference(path, request: ChatRequest, max_tokens: int, splitting: bool = True) -> str:
    """The greedy answer computed without the pool (``splitting``: the processor cuts images into tiles)."""
    from transformers import AutoProcessor

    config = read_config(path)
    processor = AutoProcessor.from_pretrained(str(path))
    processor.image_processor.do_image_splitting = splitting
    messages = [{"role": "user", "content": [{"type": "image"} if isinstance(p, Image) else
                                             {"type": "text", "text": p.text} for p in request.messages[0].parts]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [i.image for i in request.images]
    out = processor(text=[text], images=[images], return_tensors="np") if images else \
        processor(text=[text], return_tensors="np")
    ids = out["input_ids"][0]
    w = {k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(path / "model.safetensors")).items()}
    embeddings = w["model.text_model.embed_tokens.weight"][ids]
    if images:
        features = np.concatenate([_tower(w, config, tile) for tile in out["pixel_values"][0]])
        embeddings[ids == config["image_token_id"]] = features
    lm = llama.Model(llama.ModelArgs.from_dict(dict(config["text_config"], model_type="llama")))
    lm.load_weights([(k.replace("model.text_model.", "model."), mx.array(v)) for k, v in w.items()
                     if k.startswith(("model.text_model.", "lm_head."))])
    tokenizer = load_tokenizer(path, eos_token_ids=config["eos_token_id"])
    detok = tokenizer.detokenizer
    for token, _ in generate_step(mx.array(ids), lm, max_tokens=max_tokens, input_embeddings=mx.array(embeddings)):
        if token in tokenizer.eos_token_ids:
            break
        detok.add_token(token)
    detok.finalize()
    return detok.text


# -- tests ----------------------------------------------------------------------------------------------------


def test_a_vision_model_loads_as_kind_vision_with_all_its_weights(vlm, vlm_path):
    (info,) = vlm.models()
    assert info.kind == "vision" and info.state == "ready" and info.context_length == 2048
    stored = mx.load(str(vlm_path / "model.safetensors"))
    assert info.size_bytes == sum(v.nbytes for k, v in stored.items() if "position_ids" not in k)
    assert vlm.find(None, kind="chat").name == info.name  # it chats when no model is named


@pytest.mark.parametrize("parts", [("image", QUESTION), (QUESTION, "image", "and", "image")],
                         ids=["one image", "two images"])
def test_greedy_answers_equal_the_reference(vlm, vlm_path, parts):
    images = iter([picture(1), picture(2, (90, 40))])
    request = chat(*(next(images) if p == "image" else p for p in parts), max_tokens=24)
    text, result = run(vlm, request)
    assert text == reference(vlm_path, request, 24)
    assert result.usage.completion_tokens == 24 and len(set(text)) > 4
    tiles = 5 + (2 if len(request.images) == 2 else 0)  # 2 x 2 tiles and a global one; 90 x 40: 2 x 1, no global
    assert result.usage.prompt_tokens > tiles * 4  # image tokens count as prompt tokens


def test_text_chats_and_completions_run_on_a_vision_model_but_tools_are_refused(vlm):
    hello = [{"role": "user", "content": "Hello"}]
    assert vlm.chat(hello, "vlm", max_tokens=4, temperature=0).usage.completion_tokens == 4
    assert vlm.complete("The capital", "vlm", max_tokens=4, temperature=0).usage.completion_tokens == 4
    assert vlm.count_tokens(hello, "vlm") == vlm.chat(hello, "vlm", max_tokens=1).usage.prompt_tokens
    with pytest.raises(InvalidParameterError, match="vision model") as refused:
        tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
        vlm.chat(hello, "vlm", tools=[tool], tool_choice="auto")
    assert refused.value.param == "tools"


def test_an_image_requests_audit_row_counts_its_image_tokens(vlm, audit):
    request = chat(picture(11), QUESTION, max_tokens=4)
    image = vision.prompt(vlm.engine.runner("tiny-vlm").processor, request)[1]
    assert image is not None
    _, result = run(vlm, request, RequestContext(audit=audit))
    audit.flush()
    (row,) = audit.query()
    assert row["status"] == "ok" and row["model"] == "tiny-vlm" and row["completion_tokens"] == 4
    assert row["prompt_tokens"] == result.usage.prompt_tokens == len(image.ids) > len(image.starts) * image.seq_len


def test_image_and_text_requests_decode_in_one_batch_each_as_alone(vlm, vlm_path):
    text_only = chat("The capital of France is", max_tokens=240)
    requests = [text_only, chat(picture(3), QUESTION, max_tokens=32), chat(picture(4), "Describe it.", max_tokens=32)]
    texts, submitted, streams = ["", "", ""], [], []

    def read(i, stream):
        for delta in stream:
            texts[i] += delta

    readers = []
    for i, request in enumerate(requests):
        submitted.append(time.perf_counter())
        streams.append(vlm.stream(request, "vlm", RequestContext()))
        readers.append(threading.Thread(target=read, args=(i, streams[i])))
        readers[i].start()
        assert wait_for(lambda: texts[0])  # the text-only one decodes before the others come
    for reader in readers:
        reader.join()
    assert texts == [reference(vlm_path, r, r.params.max_tokens) for r in requests]
    # the image requests decoded while the text-only one did (the engine's times): in its batch, since one thread
    # steps a model's batch
    first = [t + s.result.ttft for t, s in zip(submitted, streams, strict=True)]
    last = [t + s.result.duration for t, s in zip(submitted, streams, strict=True)]
    assert all(first[0] < first[i] and last[i] < last[0] for i in (1, 2)), (first, last)


def test_the_prompt_cache_never_gives_one_images_kv_to_another(vlm, vlm_path):
    a, b = chat(picture(5), QUESTION), chat(picture(6), QUESTION)
    image = vision.prompt(vlm.engine.runner("tiny-vlm").processor, a)[1]
    assert image is not None
    first_image_token = image.starts[0]  # after <|im_start|>User:<fake_token_around_image><row_1_col_1>
    text_a, _ = run(vlm, a)
    text_b, result_b = run(vlm, b)
    assert text_a != text_b
    assert text_a == reference(vlm_path, a, 16) and text_b == reference(vlm_path, b, 16)
    assert 0 < result_b.usage.cached_tokens <= first_image_token  # the text before the image only
    again, result = run(vlm, chat(picture(5), QUESTION))
    assert again == text_a and result.usage.cached_tokens == result.usage.prompt_tokens - 1  # the same image's KV
    follow = chat(picture(5), "Describe the picture.")
    assert run(vlm, follow)[0] == reference(vlm_path, follow, 16)


def test_an_mlx_community_folder_loads_and_answers_as_the_hugging_face_one(vlm, vlm_path, make_pool, tmp_path):
    """mlx-vlm's names (vision_model.*, connector.*, language_model.*) and MLX's convolution layout."""
    folder = tmp_path / "mlx-community-vlm"
    folder.mkdir()
    for f in vlm_path.iterdir():
        if f.suffix != ".safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    renamed = {}
    for key, value in mx.load(str(vlm_path / "model.safetensors")).items():
        key = key.replace("model.text_model.", "language_model.model.").replace("lm_head.", "language_model.lm_head.")
        if key.endswith("patch_embedding.weight"):
            value = value.transpose(0, 2, 3, 1)
        renamed[key.removeprefix("model.")] = value
    mx.save_safetensors(str(folder / "model.safetensors"), renamed)
    pool = make_pool(keep_alive=None)
    pool.image_splitting = True
    pool.load(folder, alias="vlm")
    request = chat(picture(10), QUESTION)
    assert run(pool, request)[0] == run(vlm, request)[0]
    assert run(pool, chat("Hello", max_tokens=8))[0] == run(vlm, chat("Hello", max_tokens=8))[0]
    conversation = ChatRequest((Message("user", (Image(picture(10), 1, "d", "f"), Text(QUESTION))),
                                Message("assistant", ()), Message("user", (Text("And?"),))),
                               params=make_params(max_tokens=8, temperature=0))
    assert run(pool, conversation)[0] == run(vlm, conversation)[0]  # an empty turn templates as an empty text


def test_every_surface_sends_an_image_to_a_vision_model_and_gets_the_reference_answer(vlm, vlm_path):
    """pool.chat with a PIL image, and the OpenAI, Anthropic and Responses SDKs with the same PNG, as data."""
    import anthropic
    import openai

    from mlx_manager_nb.server import serve

    buf = io.BytesIO()
    picture(12).save(buf, format="PNG")
    png = buf.getvalue()
    decoded = PILImage.open(io.BytesIO(png)).convert("RGB")
    expected = reference(vlm_path, chat(decoded, QUESTION, max_tokens=12), 12)
    answer = vlm.chat([{"role": "user", "content": [{"type": "image", "image": decoded},
                                                    {"type": "text", "text": QUESTION}]}], "vlm", max_tokens=12,
                      temperature=0)
    assert answer.text == expected and len(set(expected)) > 3
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    server = serve(vlm, port=0, mode="thread")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        completion = client.chat.completions.create(model="vlm", max_tokens=12, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "auto"}},
                                         {"type": "text", "text": QUESTION}]}])
        assert completion.choices[0].message.content == expected
        assert completion.usage.prompt_tokens == answer.usage.prompt_tokens
        response = client.responses.create(model="vlm", max_output_tokens=12, temperature=0, input=[
            {"role": "user", "content": [{"type": "input_image", "image_url": url, "detail": "auto"},
                                         {"type": "input_text", "text": QUESTION}]}])
        assert response.output_text == expected
        claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
        message = claude.messages.create(model="vlm", max_tokens=12, extra_body={"temperature": 0}, messages=[
            {"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": base64.b64encode(png).decode()}},
                {"type": "text", "text": QUESTION}]}])
        assert message.content[0].text == expected
    finally:
        server.stop(drain=0)


def test_a_quantized_folder_loads_quantized_or_as_float32_with_the_same_answers(vlm_path, make_pool, tmp_path):
    import json
    import shutil

    import mlx.nn as nn
    from mlx.utils import tree_flatten

    folder = tmp_path / "tiny-vlm-4bit"
    shutil.copytree(vlm_path, folder)
    config = read_config(vlm_path)
    model = vision.build(vlm_path, config)
    nn.quantize(model, group_size=32, bits=4)
    mx.save_safetensors(str(folder / "model.safetensors"), {  # mlx-community's names
        k.removeprefix("vision.") if k.startswith("vision.") else "language_model." + k: v
        for k, v in tree_flatten(model.parameters())})
    (folder / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 32, "bits": 4}}))
    answers = []
    for dequantize in (False, True):
        pool = make_pool(keep_alive=None, dequantize=dequantize)
        info = pool.load(folder, alias="vlm")
        answers.append((info.size_bytes, run(pool, chat(picture(14), QUESTION, max_tokens=8))[0]))
    (packed, quantized), (floats, dequantized) = answers
    assert quantized == dequantized and len(set(quantized)) > 2 and packed < floats / 2


@pytest.fixture(scope="module")
def wide_vlm(tmp_path_factory):
    """A tiny VLM whose tower is wide enough that encoding an image's five tiles takes many slices."""
    from mlx_manager_nb.model_pool import Pool

    path = build_tiny_vlm(tmp_path_factory.mktemp("wide-vlm") / "wide-vlm", tile=128, patch=8, scale=4,
                          hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=8)
    pool = Pool(keep_alive=None)
    pool.image_splitting = True
    pool.load(path, alias="vlm")
    # a reader thread starved by a loaded machine must not get its stream parked (backpressure, tested elsewhere):
    # a parked stream is not decoding, and slices then take the idle second
    pool.engine.unread_events = 10**6
    yield pool
    pool.close()


def test_a_stream_keeps_its_pace_while_an_image_encodes(wide_vlm):
    runner = wide_vlm.engine.runner("wide-vlm")
    image = vision.prompt(runner.processor, chat(picture(7, (200, 250)), QUESTION))[1]
    assert image is not None and len(image.pixels) == 5
    whole = wide_vlm.engine.run(_timed, lambda: mx.eval(runner.model.vision(
        mx.array(image.pixels), mx.array(image.positions)))).result()

    def gaps(during):
        stamps: list[float] = []
        bystander = wide_vlm.stream(chat("The capital of France is", max_tokens=2000), "vlm", RequestContext())

        def read():
            for _ in bystander:
                stamps.append(time.perf_counter())

        reader = threading.Thread(target=read)
        reader.start()
        assert wait_for(lambda: len(stamps) > 20)
        start = time.perf_counter()
        during()
        end = time.perf_counter()
        bystander.close()
        reader.join()
        inside = [t for t in stamps if start <= t <= end]
        return [b - a for a, b in itertools.pairwise(stamps) if start <= b and a <= end], len(inside)

    quiet, _ = gaps(lambda: time.sleep(0.3))
    loud, tokens = gaps(lambda: run(wide_vlm, chat(picture(7, (200, 250)), QUESTION, max_tokens=1)))
    # encoded whole, the image would stop the stream for `whole` seconds; in slices the stream gets a token
    # after every slice, each about one decode step long (at least slices.SLICE_FLOOR)
    assert whole > 0.3, whole
    assert tokens >= 20, tokens
    assert statistics.median(loud) <= 3 * max(statistics.median(quiet), slices.SLICE_FLOOR), loud
    assert max(loud) < whole / 2, (max(loud), whole)


def test_each_slice_of_an_encode_keeps_to_its_budget(wide_vlm):
    runner = wide_vlm.engine.runner("wide-vlm")
    budget = 0.05

    def slice_times() -> list[float]:  # on the engine thread, as the engine drives an encode
        image = vision.prompt(runner.processor, chat(picture(7, (200, 250)), QUESTION))[1]
        job = vision.encode(runner.model, image, 0, budget, lambda: True)
        took, start = [], time.perf_counter()
        with contextlib.suppress(StopIteration):
            next(job)
            while True:
                took.append(time.perf_counter() - start)
                start = time.perf_counter()
                job.send(budget)
        return took

    took = wide_vlm.engine.run(slice_times).result()
    assert len(took) > 10 and statistics.median(took) < 1.3 * budget, took  # pieces fit what is left of a slice


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def test_cancelling_or_a_deadline_while_an_image_encodes_ends_it(wide_vlm):
    runner = wide_vlm.engine.runner("wide-vlm")
    stream = wide_vlm.stream(chat(picture(8, (200, 250)), QUESTION), "vlm", RequestContext())
    assert wait_for(lambda: runner.prefilling)
    stream.close()
    assert wait_for(lambda: not runner.prefilling and not runner.active)
    assert wait_for(lambda: wide_vlm.models()[0].in_flight == 0)
    late = run(wide_vlm, chat(picture(9, (200, 250)), QUESTION),
               RequestContext(deadline=time.perf_counter() + 0.05))[1]
    assert late.finish_reason == "timeout" and late.usage.completion_tokens == 0
    assert run(wide_vlm, chat(picture(9, (200, 250)), QUESTION, max_tokens=3))[1].usage.completion_tokens == 3


def test_the_chat_magic_sends_a_notebook_image_to_a_vision_model(shell, vlm_path):
    from IPython.utils.capture import capture_output

    with capture_output():
        shell.run_line_magic("mlx", f"load {vlm_path} --as vlm")
    shell.user_ns["img"] = picture(13)
    with capture_output() as c:
        shell.run_cell_magic("chat", "vlm -t 0 --max-tokens 12 --image img --out answer", QUESTION)
    assert "Traceback" not in c.stderr
    # the magic sends the text first, then the images; the kernel's pool on a CPU does not cut images into tiles
    assert shell.user_ns["answer"] == reference(vlm_path, chat(QUESTION, picture(13), max_tokens=12), 12,
                                                splitting=mx.default_device().type != mx.DeviceType.cpu)


def test_a_request_whose_image_is_cached_holds_no_pixels_while_it_decodes(vlm, monkeypatch):
    """The second ask of an image finds its image tokens in the prompt cache and joins the batch at once: its
    tiles are dropped then, as a prefilled request's are (not held until it ends)."""
    submitted = []
    submit = vlm.engine.submit
    monkeypatch.setattr(vlm.engine, "submit", lambda request: (submitted.append(request), submit(request))[1])
    image = picture(11)
    first, _ = run(vlm, chat(image, "What is in this image?"))
    again, result = run(vlm, chat(image, "What is in this image?"))
    prefilled, cached = (r.images for r in submitted)
    assert again == first and result.usage.cached_tokens >= cached.end  # its image tokens were all cached
    assert prefilled.pixels.size == 0  # dropped once its prompt was prefilled
    assert cached.pixels.size == 0 and not cached.features  # dropped as it joined the batch
