"""Images in: decoded and checked once for every front end, each protocol's parts read into image parts, and
every bad image (a non-image, a truncated PNG, a decompression bomb, too many, a remote URL on a server that
downloads none, one sent to a text-only model) a 400 naming its field, with an audit row, beside bystanders."""

import asyncio
import base64
import io
import json
import struct
import sys
import threading
import zlib
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import anthropic
import numpy as np
import openai
import pytest
from aiohttp import web
from helpers import with_bystanders
from PIL import Image as PIL

from mlx_manager_nb import images
from mlx_manager_nb.errors import InvalidParameterError
from mlx_manager_nb.panels import chat as chat_panel_module
from mlx_manager_nb.request import Text, python_request
from mlx_manager_nb.runner import audit_messages
from mlx_manager_nb.server import serve
from mlx_manager_nb.widgets import chat_panel


def encoded(img, fmt="PNG", **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def png(width=8, height=6, color="red") -> bytes:
    return encoded(PIL.new("RGB", (width, height), color))


def data_url(data: bytes, media_type="image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def bilevel_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of ``width`` x ``height`` white pixels, compressed row by row (a 20,000 x 20,000 one
    is about 50 KB; decoded as RGB it would be 1.2 GB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" + b"\xff" * ((width + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return bilevel_png(20_000, 20_000)


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, *parts]}]


def image(value) -> dict:
    return {"type": "image", "image": value}


def one(value):
    """The image of a Python call's single image part."""
    (img,) = python_request(user(image(value))).images
    return img


def refused(messages) -> InvalidParameterError:
    with pytest.raises(InvalidParameterError) as info:
        python_request(messages)
    return info.value


# -- decoding ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_each_format_decodes_to_rgb_with_its_bytes_digest_and_field(fmt):
    data = encoded(PIL.new("RGB", (12, 7), (200, 10, 10)), fmt)
    img = one(data)
    assert img.image.mode == "RGB" and img.image.size == (12, 7) and img.format == fmt
    assert img.nbytes == len(data) and img.field == "messages[0].content[1]"
    r, g, b = img.image.getpixel((5, 3))
    assert r > 150 and g < 60 and b < 60
    assert one(data).digest == img.digest != one(png()).digest  # the same bytes, the same digest


def test_a_gif_gives_its_first_frame_and_exif_orientation_is_applied():
    frames = [PIL.new("RGB", (6, 6), c) for c in ("red", "blue")]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert one(gif).image.getpixel((2, 2))[0] > 200  # red, the first frame
    exif = PIL.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    assert one(encoded(PIL.new("RGB", (40, 20)), "JPEG", exif=exif)).image.size == (20, 40)


def test_python_values_a_path_an_array_a_pil_image_and_a_figure(tmp_path):
    from matplotlib.figure import Figure

    path = tmp_path / "p.png"
    path.write_bytes(png(5, 4))
    assert one(path).image.size == one(str(path)).image.size == (5, 4)
    gray = one(np.zeros((3, 7), np.uint8))
    assert gray.image.size == (7, 3) and gray.format == "pixels" and gray.nbytes == 3 * 7 * 3
    rgba = one(np.full((2, 2, 4), 255, np.uint8))
    assert rgba.image.getpixel((0, 0)) == (255, 255, 255)
    assert one(np.ones((2, 3, 3)) * 0.5).image.getpixel((0, 0)) == (128, 128, 128)
    assert one(PIL.new("RGBA", (4, 4), (0, 255, 0, 128))).image.getpixel((1, 1)) == (127, 255, 127)  # over white
    clear = PIL.new("P", (4, 4))
    clear.info["transparency"] = 0
    assert one(encoded(clear, "GIF")).image.getpixel((0, 0)) == (255, 255, 255)
    assert one(PIL.new("L", (4, 4))).digest != one(PIL.new("L", (4, 5))).digest
    fig = Figure(figsize=(2, 1), dpi=50)
    fig.add_subplot().plot([0, 1], [1, 0])
    assert one(fig).image.size == (100, 50)
    assert one(data_url(png(3, 3))).image.size == (3, 3)
    chat = python_request(user(image(png()), {"type": "image_url", "image_url": {"url": data_url(png()),
                                                                                  "detail": "high"}}))
    assert [type(p).__name__ for p in chat.messages[0].parts] == ["Text", "Image", "Image"]
    assert chat.messages[0].parts[0] == Text("What is this?")


@pytest.mark.parametrize("value,says", [
    (b"hello, I am not an image", "is not an image this server reads"),
    (encoded(PIL.new("RGB", (4, 4)), "BMP"), "is not an image this server reads"),
    (encoded(PIL.effect_noise((64, 64), 50).convert("RGB"))[:600], "is not a readable PNG image"),
    (np.zeros((2, 2, 5), np.uint8), "shape (2, 2, 5)"),
    (np.full((2, 2), 1.5), "values in 0..1"),
    (np.zeros((2, 2), np.int64), "got int64"),
    ("https://example.com/cat.png", "remote URLs are not downloaded"),
    ("/no/such/image.png", "no image file"),
    (42, "not int"),
    ("data:text/plain;base64,aGk=", "not of an image"),
    ("data:image/png,raw", "must be a base64 data URL"),
    ("data:image/png;base64,!!!!", "not valid base64"),
])
def test_bad_images_are_refused_naming_the_field(value, says):
    e = refused(user(image(value)))
    assert e.param == "messages[0].content[1]" and says in str(e), str(e)


def test_a_decompression_bomb_is_refused_from_its_header(bomb):
    assert len(bomb) < 100_000
    e = refused(user(image(bomb)))
    assert e.param == "messages[0].content[1]" and "at most 50,000,000" in str(e)
    e = refused(user(image(bilevel_png(9_000, 9_000))))  # under PIL's own 89 Mpx check: ours refuses it
    assert "9,000 x 9,000 pixels" in str(e)


def test_caps_on_bytes_count_and_pixels_per_request(monkeypatch):
    e = refused(user(*[image(png())] * 100))
    assert e.param == "messages[0].content[21]" and "at most 20 images" in str(e)  # the 21st, before decoding it
    monkeypatch.setattr(images.LIMITS, "max_bytes", 50)
    e = refused(user(image(png(64, 64, "blue"))))
    assert "bytes; an image may be at most 50" in str(e)
    assert "an image may be at most 50" in str(refused(user({"type": "image_url", "image_url": {
        "url": data_url(png(64, 64))}})))
    monkeypatch.setattr(images.LIMITS, "max_bytes", 2**20)
    monkeypatch.setattr(images.LIMITS, "request_pixels", 1000)
    e = refused(user(image(png(20, 20)), image(png(20, 20)), image(png(20, 20))))
    assert e.param == "messages[0].content[3]" and "more than 1,000 pixels together" in str(e)
    pixels = [PIL.new("RGB", (20, 20)), np.zeros((20, 20, 3), np.uint8), PIL.new("L", (20, 20))]
    e = refused(user(*map(image, pixels)))  # images given as pixels count alike
    assert e.param == "messages[0].content[3]" and "more than 1,000 pixels together" in str(e)


def test_without_pillow_an_image_is_refused_saying_what_to_install(monkeypatch):
    given = (png(), np.zeros((2, 2), np.uint8))
    monkeypatch.setitem(sys.modules, "PIL", None)  # as where the vision extra is not installed
    for value in given:
        e = refused(user(image(value)))
        assert e.param == "messages[0].content[1]" and "pip install 'mlx_manager_nb[vision]'" in str(e)


def test_images_only_in_user_messages_and_the_detail_is_checked():
    e = refused([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [image(png())]}])
    assert e.param == "messages[1].content[0]" and "not supported here" in str(e)
    e = refused(user({"type": "image_url", "image_url": {"url": data_url(png()), "detail": "huge"}}))
    assert e.param == "messages[0].content[1].image_url.detail"


def test_stored_content_describes_images_never_their_bytes():
    data = png(9, 5)
    (message,) = audit_messages(python_request(user(image(data))))
    assert message["content"] == "What is this?"
    assert message["images"] == [{"field": "messages[0].content[1]", "format": "PNG", "size": [9, 5],
                                  "bytes": len(data), "sha256": images.decode(data, "x").digest}]
    assert base64.b64encode(data).decode()[:20] not in json.dumps(message)


# -- the pool: a text-only model refuses images, naming the field, with an audit row ------------------------


def test_an_image_to_a_text_only_model_is_refused_naming_the_field_with_its_audit_row(pool, audit):
    data = png()
    with pytest.raises(InvalidParameterError) as info:
        pool.chat(user(image(data)), max_tokens=2)
    assert info.value.param == "messages[0].content[1]"
    assert str(info.value).startswith("model 'tiny' does not take images (messages[0].content[1])")
    audit.flush()
    (row,) = audit.query()
    assert row["status"] == "error" and row["images"] == 1 and row["image_bytes"] == len(data)
    assert pool.chat([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], max_tokens=2).text
    with pytest.raises(InvalidParameterError, match=r"scoring takes text; messages\[0\].content\[1\] is an image"):
        pool.score(user(image(data)), " It is red.")


# -- HTTP: every protocol's image parts, and its refusals ----------------------------------------------------


def openai_body(*parts, **extra) -> dict:
    return {"model": "tiny", "max_tokens": 3, "messages": user(*parts), **extra}


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


async def post(http, url, body):
    async with http.post(url, json=body) as r:
        return r.status, await r.json()


BAD = {
    "non-image": (image_url(data_url(b"not an image at all")), "messages[0].content[1]", "not an image"),
    "truncated PNG": (image_url(data_url(png(64, 64)[:-30])), "messages[0].content[1]", "not a readable PNG"),
    "text-only model": (image_url(data_url(png())), "messages[0].content[1]", "does not take images"),
    "remote URL": (image_url("http://127.0.0.1:9/cat.png"), "messages[0].content[1]", "does not download images"),
    "python image part": (image("/etc/hostname"), "messages[0].content[1]", "of type 'image' is not supported"),
}


@pytest.mark.parametrize("part,param,says", BAD.values(), ids=BAD.keys())
def test_bad_images_over_http_are_400s_naming_the_field_beside_bystanders(server, pool, audit, part, param, says):
    url = server.url + "/v1/chat/completions"
    status, answer = with_bystanders(server, pool, lambda http: post(http, url, openai_body(part)), n=2)
    assert status == 400 and answer["error"]["param"] == param and says in answer["error"]["message"]
    audit.flush()
    (row,) = [r for r in audit.query() if r["http_status"] == 400]
    assert row["endpoint"] == "/v1/chat/completions" and says in row["error_message"]


def protocol_body(protocol: str, data: bytes | None = None, url: str | None = None) -> tuple[str, dict]:
    """(path, body) of a request holding one image, given as ``data`` or by ``url``, after a text part."""
    url = url or data_url(data)
    if protocol == "anthropic":
        source = {"type": "url", "url": url} if data is None else {
            "type": "base64", "media_type": "image/png", "data": base64.b64encode(data).decode()}
        return "/v1/messages", {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image", "source": source}]}]}
    return "/v1/responses", {"model": "tiny", "max_output_tokens": 3, "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"}, {"type": "input_image", "image_url": url}]}]}


OTHER_BAD = {
    "non-image": ({"data": b"not an image at all"}, "not an image"),
    "truncated PNG": ({"data": png(64, 64)[:-30]}, "not a readable PNG"),
    "text-only model": ({"data": png()}, "does not take images"),
    "remote URL": ({"url": "https://127.0.0.1:9/cat.png"}, "does not download images"),
}


@pytest.mark.parametrize("protocol,field", [("anthropic", "messages.0.content.1"),
                                            ("responses", "input[0].content[1]")])
@pytest.mark.parametrize("given,says", OTHER_BAD.values(), ids=OTHER_BAD.keys())
def test_bad_images_in_anthropic_and_responses_are_400s_naming_the_field_beside_bystanders(
        server, pool, audit, protocol, field, given, says):
    path, body = protocol_body(protocol, **given)
    status, answer = with_bystanders(server, pool, lambda http: post(http, server.url + path, body), n=2)
    message = answer["error"]["message"]
    assert status == 400 and field in message and says in message
    if protocol == "responses":
        assert answer["error"]["param"] == field
    audit.flush()
    (row,) = [r for r in audit.query() if r["http_status"] == 400]
    assert row["endpoint"] == path and says in row["error_message"]


def test_a_bomb_and_a_hundred_images_are_400s_beside_bystanders(server, pool, bomb):
    url = server.url + "/v1/chat/completions"

    async def both(http):
        return (await post(http, url, openai_body(image_url(data_url(bomb)))),
                await post(http, url, openai_body(*[image_url(data_url(png()))] * 100)))

    (s1, a1), (s2, a2) = with_bystanders(server, pool, both, n=2)
    assert (s1, a1["error"]["param"]) == (400, "messages[0].content[1]") and "pixels" in a1["error"]["message"]
    assert (s2, a2["error"]["param"]) == (400, "messages[0].content[21]") and "at most 20 images" in a2["error"][
        "message"]


def test_the_sdks_send_images_and_the_text_only_refusal_names_each_protocols_field(server, audit):
    data = png()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", max_tokens=3, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": data_url(data), "detail": "low"}}]}])
    assert info.value.body["param"] == "messages[0].content[1]" and "does not take images" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="tiny", input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": data_url(data), "detail": "auto"}]}])
    assert info.value.body["param"] == "input[0].content[1]" and "does not take images" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="tiny", input=[{"role": "user", "content": [
            {"type": "input_image", "file_id": "file-123", "detail": "auto"}]}])
    assert info.value.body["param"] == "input[0].content[0].file_id"
    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": base64.b64encode(data).decode()}}
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model="tiny", max_tokens=3, messages=[{"role": "user", "content": [
            block, {"type": "text", "text": "What is this?"}]}])
    assert info.value.body["error"]["message"].startswith("model 'tiny' does not take images (messages.0.content.0)")
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.count_tokens(model="tiny", messages=[{"role": "user", "content": [block]}])
    assert "messages.0.content.0" in info.value.body["error"]["message"]
    for bad, says in (({**block, "source": {**block["source"], "media_type": "image/bmp"}}, "media_type"),
                      ({"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                       "does not download images")):
        with pytest.raises(anthropic.BadRequestError) as info:
            claude.messages.create(model="tiny", max_tokens=3, messages=[{"role": "user", "content": [bad]}])
        assert "messages.0.content.0" in info.value.body["error"]["message"] and says in str(info.value)
    audit.flush()
    counted = [(r["images"], r["image_bytes"]) for r in audit.query() if r["images"]]
    assert counted == [(1, len(data))] * 3  # the three refused at the model: read, their images counted


# -- downloads: only where the server allows them, with a byte cap and a timeout ------------------------------


def test_image_urls_are_downloaded_only_where_allowed_within_caps(pool, monkeypatch):
    data = png(10, 10)
    seen = []

    async def handle(request):
        seen.append(request.path)
        if request.path == "/slow.png":
            await asyncio.sleep(3)
        if request.path == "/missing.png":
            raise web.HTTPNotFound()
        return web.Response(body=data * 50 if request.path == "/big.png" else data, content_type="image/png")

    monkeypatch.setattr(images.LIMITS, "max_bytes", 2_000)
    monkeypatch.setattr(images.LIMITS, "fetch_seconds", 0.5)
    allowing = serve(pool, port=0, mode="thread", allow_image_urls=True)
    refusing = serve(pool, port=0, mode="thread")

    async def main():
        app = web.Application()
        app.router.add_get("/{name}", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        try:
            async with aiohttp.ClientSession() as http:
                out = {}
                for name in ("ok.png", "big.png", "slow.png", "missing.png"):
                    out[name] = await post(http, allowing.url + "/v1/chat/completions",
                                           openai_body(image_url(f"{base}/{name}")))
                out["anthropic"] = await post(http, allowing.url + "/v1/messages", {
                    "model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": [
                        {"type": "image", "source": {"type": "url", "url": f"{base}/ok.png"}}]}]})
                seen_before = list(seen)
                out["refused"] = await post(http, refusing.url + "/v1/chat/completions",
                                            openai_body(image_url(f"{base}/ok.png")))
                return out, seen_before
        finally:
            await runner.cleanup()

    try:
        out, seen_before = asyncio.run(main())
    finally:
        allowing.stop(drain=0)
        refusing.stop(drain=0)
    messages = {k: (status, a["error"]["message"]) for k, (status, a) in out.items()}
    assert messages["ok.png"][0] == 400 and "does not take images" in messages["ok.png"][1]  # downloaded, decoded
    assert "does not take images (messages.0.content.0)" in messages["anthropic"][1]
    assert "over 2,000 bytes" in messages["big.png"][1]
    assert "download" in messages["slow.png"][1]
    assert "answered HTTP 404" in messages["missing.png"][1]
    assert "does not download images" in messages["refused"][1]
    assert seen == seen_before  # the refusing server fetched nothing


# -- the chat panel: an upload goes with the message, with a thumbnail ---------------------------------------


def test_the_panels_upload_goes_with_the_message_and_a_refusal_shows(pool, audit):
    panel = chat_panel(pool).parts
    data = png(300, 150, "green")
    panel.upload.value = ({"name": "plot.png", "type": "image/png", "size": len(data), "content": memoryview(data),
                           "last_modified": datetime.now(timezone.utc)},)
    panel.prompt.value = "What is in this plot?"
    panel.send.click()
    assert "does not take images (messages[0].content[1])" in panel.error.value
    assert panel.history == [] and panel.upload.value  # kept, to send to another model
    audit.flush()
    (row,) = audit.query(source="widget")
    assert (row["images"], row["image_bytes"]) == (1, len(data))
    turn = chat_panel_module._image_parts(panel.upload.value)
    thumb = PIL.open(io.BytesIO(base64.b64decode(turn[0]["thumbnail"])))
    assert thumb.size == (96, 48)
    outputs = chat_panel_module._turn("user", "What is in this plot?", [turn[0]["thumbnail"]])
    assert [list(o["data"]) for o in outputs][1] == ["image/png", "text/plain"]


# -- %%chat --image -------------------------------------------------------------------------------------------


def test_chat_magic_sends_images_from_variables_and_files(shell, tiny_model_path, tmp_path):
    from IPython.utils.capture import capture_output

    with capture_output():
        shell.run_line_magic("mlx", f"load {tiny_model_path} --as tiny")
    path = tmp_path / "cat.png"
    path.write_bytes(png())
    shell.user_ns["arr"] = np.zeros((4, 4, 3), np.uint8)
    for line, says in ((f"tiny --image arr --image {path}", "does not take images (messages[0].content[1])"),
                       ("tiny --image nothing_here", "--image nothing_here: no such variable")):
        with capture_output() as c:
            shell.run_cell_magic("chat", line, "What is this?")
        assert says in c.stderr and "Traceback" not in c.stderr
    assert Path(path).exists()


def test_images_are_decoded_in_the_check_pool_never_on_the_event_loop(server, monkeypatch):
    threads = []
    decode = images.decode

    def recording(data, where):
        threads.append(threading.current_thread().name)
        return decode(data, where)

    monkeypatch.setattr(images, "decode", recording)
    for path, body in (("/v1/chat/completions", openai_body(image_url(data_url(png())))),
                       ("/v1/responses", {"model": "tiny", "input": [{"role": "user", "content": [
                           {"type": "input_image", "image_url": data_url(png())}]}]}),
                       ("/v1/messages", {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": [
                           {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                        "data": base64.b64encode(png()).decode()}}]}]})):
        status, answer = asyncio.run(_post_once(server.url + path, body))
        assert status == 400 and "does not take images" in json.dumps(answer)
    assert len(threads) == 3 and all(name.startswith("mlx-schema-checks") for name in threads)


async def _post_once(url, body):
    async with aiohttp.ClientSession() as http:
        return await post(http, url, body)
