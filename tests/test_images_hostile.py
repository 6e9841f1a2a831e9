"""A hostile client's images: malformed data URLs, oversized bodies, too many images, images where a
protocol takes none, ``image_url`` of the wrong type, and odd but valid images (CMYK, 16-bit, palette,
grey with alpha, a 1 x 1 PNG with megabytes of data, a GIF of 10,000 frames): each a 400 naming its field,
or decoded as it shows, with bystander streams unharmed."""

import base64
import io
import json
import os
import struct
import time
import zlib

import numpy as np
import pytest
from helpers import with_bystanders
from PIL import Image as PIL
from test_images import data_url, encoded, image_url, png, post, user

from mlx_manager_nb import images


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, depth: int, color_type: int, idat: bytes) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# -- odd but valid images decode as they show ----------------------------------------------------------------


def pixel(data: bytes) -> tuple[int, int, int]:
    img = images.decode(data, "f").image
    assert img.mode == "RGB"
    return img.getpixel((0, 0))


def test_cmyk_palette_and_grey_with_alpha_decode_as_they_show():
    assert pixel(encoded(PIL.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")) == (255, 0, 0)
    p = PIL.new("P", (8, 8), 3)
    p.putpalette([0, 0, 0, 10, 10, 10, 20, 20, 20, 200, 0, 0] * 64)
    assert pixel(encoded(p)) == (200, 0, 0)
    assert pixel(encoded(p, transparency=3)) == (255, 255, 255)  # a transparent index: over white
    assert pixel(encoded(PIL.new("LA", (8, 8), (100, 255)))) == (100, 100, 100)
    assert pixel(encoded(PIL.new("LA", (8, 8), (100, 0)))) == (255, 255, 255)


def test_sixteen_bit_images_keep_their_levels():
    grey = encoded(PIL.fromarray(np.full((8, 8), 40_000, np.uint16)))  # 61% grey, not white
    assert pixel(grey) == (156, 156, 156)
    assert pixel(encoded(PIL.fromarray(np.full((8, 8), 1_000, np.uint16)))) == (4, 4, 4)
    rgb16 = raw_png(4, 4, 16, 2, zlib.compress((b"\0" + b"\x80\x00" * 12) * 4))
    assert pixel(rgb16) == (128, 128, 128)
    grey_alpha16 = raw_png(4, 4, 16, 4, zlib.compress((b"\0" + b"\x40\x00\xff\xff" * 4) * 4))
    assert pixel(grey_alpha16) == (64, 64, 64)


def test_a_one_pixel_png_with_megabytes_of_data_and_a_gif_of_ten_thousand_frames_decode_their_first_pixels():
    rows = zlib.compress(b"\0\x80\x80\x80" * 4_000_000)  # a 1 x 1 header over 4 million rows of data
    padded = raw_png(1, 1, 8, 2, zlib.compress(b"\0\x80\x80\x80") + os.urandom(8_000_000))
    frames = [PIL.new("P", (4, 4), i % 200) for i in range(10_000)]
    for i, frame in enumerate(frames):
        frame.putpixel((i % 4, i // 4 % 4), i * 7 % 256)
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=10)
    start = time.monotonic()
    assert images.decode(raw_png(1, 1, 8, 2, rows), "f").image.size == (1, 1)
    assert images.decode(padded, "f").image.size == (1, 1)
    assert images.decode(buf.getvalue(), "f").image.size == (4, 4)
    assert time.monotonic() - start < 10  # the first frame only, not 10,000


def test_an_oversized_base64_string_is_refused_before_it_is_decoded():
    with pytest.raises(images.InvalidParameterError, match="at most 20,971,520"):
        images.from_base64("A" * 30_000_000, "f")


# -- over HTTP, beside bystanders -------------------------------------------------------------------------


def chat(*parts, messages=None) -> tuple[str, dict]:
    return "/v1/chat/completions", {"model": "tiny", "max_tokens": 3, "messages": messages or user(*parts)}


def anthropic(messages, **extra) -> tuple[str, dict]:
    return "/v1/messages", {"model": "tiny", "max_tokens": 3, "messages": messages, **extra}


PNG = data_url(png())
B64 = base64.b64encode(png()).decode()
ANTHROPIC_IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64}}
TOOL_USE = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "plot", "input": {}}]}
HOSTILE = {
    "invalid base64": (chat(image_url("data:image/png;base64,iVBOR%%%")), "messages[0].content[1]",
                       "not valid base64"),
    "a data URL of HTML": (chat(image_url("data:text/html;base64," + B64)), "messages[0].content[1]",
                           "not of an image"),
    "an Anthropic media type of BMP": (anthropic([{"role": "user", "content": [
        {**ANTHROPIC_IMAGE, "source": {**ANTHROPIC_IMAGE["source"], "media_type": "image/bmp"}}]}]),
        "messages.0.content.0.source.media_type", "must be one of"),
    "21 images": (chat(*[image_url(PNG)] * 21), "messages[0].content[21]", "at most 20 images"),
    "an image in an assistant turn": (chat(messages=[*user(), {"role": "assistant", "content": [image_url(PNG)]}]),
                                      "messages[1].content[0]", "not supported"),
    "an image in a system turn": (chat(messages=[{"role": "system", "content": [image_url(PNG)]}, *user()]),
                                  "messages[0].content[0]", "not supported"),
    "an Anthropic image in an assistant turn": (anthropic([{"role": "user", "content": "Hi"}, {
        "role": "assistant", "content": [ANTHROPIC_IMAGE]}]), "messages.1.content.0", "not supported"),
    "an Anthropic image in the system prompt": (anthropic([{"role": "user", "content": "Hi"}],
                                                          system=[ANTHROPIC_IMAGE]), "system.0", "not supported"),
    "a Responses image in an assistant turn": (("/v1/responses", {"model": "tiny", "input": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": [
            {"type": "input_image", "image_url": PNG}]}]}), "input[1].content[0]", "not supported"),
    "an image in an Anthropic tool result": (anthropic([{"role": "user", "content": "Plot it"}, TOOL_USE, {
        "role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "text", "text": "done"}, ANTHROPIC_IMAGE]}]}]), "messages.2.content.0.content.1", "image"),
    "an image in an OpenAI tool message": (chat(messages=[*user(), {"role": "assistant", "tool_calls": [{
        "id": "c1", "type": "function", "function": {"name": "plot", "arguments": "{}"}}]}, {
        "role": "tool", "tool_call_id": "c1", "content": [image_url(PNG)]}]),
        "messages[2].content[0]", "not supported"),
    "an image in a Responses function_call_output": (("/v1/responses", {"model": "tiny", "input": [
        {"role": "user", "content": "Plot it"},
        {"type": "function_call", "call_id": "c1", "name": "plot", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_image", "image_url": PNG}]}]}),
        "input[2].output[0]", "not supported"),
    "image_url a number": (chat({"type": "image_url", "image_url": 5}), "messages[0].content[1]",
                           "must be a string"),
    "image_url a nested dict": (chat({"type": "image_url", "image_url": {"url": {"url": PNG}}}),
                                "messages[0].content[1]", "must be a string"),
    "a Responses image_url a number": (("/v1/responses", {"model": "tiny", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": 5}]}]}), "input[0].content[0]", "must be a data URL"),
}


@pytest.mark.parametrize("sent,param,says", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_images_are_400s_naming_the_field_beside_bystanders(server, pool, sent, param, says):
    path, body = sent
    status, answer = with_bystanders(server, pool, lambda http: post(http, server.url + path, body), n=2)
    error = answer["error"]
    assert status == 400 and says in error["message"], error
    assert param in error["message"] and error.get("param", param) == param, error  # Anthropic's errors name no param


def test_nan_and_a_body_over_the_limit_are_refused_beside_bystanders(server, pool):
    nan = json.dumps(chat(image_url(PNG))[1]).replace('"max_tokens": 3', '"max_tokens": NaN')
    huge = json.dumps(chat(image_url("data:image/png;base64," + "A" * 30_000_000))[1])

    async def both(http):
        out = []
        for raw in (nan, huge):
            async with http.post(server.url + "/v1/chat/completions", data=raw,
                                 headers={"content-type": "application/json"}) as r:
                out.append((r.status, await r.json()))
        return out

    (s1, a1), (s2, a2) = with_bystanders(server, pool, both, n=2)
    assert s1 == 400 and "NaN" in a1["error"]["message"], a1
    assert s2 == 413 and a2["error"]["type"] == "invalid_request_error", a2
