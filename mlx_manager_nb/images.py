"""Images in requests, decoded and checked the same way for every front end.

Each protocol's parser turns what it was sent (a ``data:`` URL, base64 with its media type, an
``http(s)`` URL; in Python also a PIL image, a NumPy array, a path, bytes or a matplotlib figure)
into a :class:`~mlx_manager_nb.request.Image`: an RGB PIL image, the bytes it came as and their
digest, and the field that held it in the protocol's terms. A non-image, a truncated file, an image
over :data:`LIMITS` or too many images in one request are an
:class:`~mlx_manager_nb.errors.InvalidParameterError` naming that field. An image's size is read from
its header and checked before a pixel is decoded (a 20,000 x 20,000 PNG is a few KB compressed and
1.2 GB decoded). Libraries downstream are only ever given decoded images, never strings, which
mlx-vlm and transformers would fetch themselves.

A request's images are counted together within :func:`reading` (the server's checks, each Python
call). Remote URLs are fetched only by a reading given a ``fetch`` function (a server started with
``allow_image_urls=True``: see :func:`downloader`); otherwise they are refused, so that a client
cannot make the kernel fetch URLs.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import hashlib
import io
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidParameterError
from .request import Image
from .schema_limits import tick

FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
PART_TYPES = ("image", "image_url", "input_image")  # content parts that hold an image, in every protocol
DATA_URL = re.compile(r"^data:(?P<type>[^;,]*)((?:;[^;,]*)*?);base64,", re.IGNORECASE)


@dataclass
class ImageLimits:
    """Caps on images; change them on :data:`LIMITS` (``images.LIMITS.max_images = ...``)."""

    max_bytes: int = 20 * 2**20  # one image as sent (decoded from base64), or downloaded
    max_pixels: int = 50_000_000  # one image, read from its header before decoding (PIL warns at 89.5 Mpx)
    max_images: int = 20  # in one request
    request_pixels: int = 100_000_000  # every image of one request together
    fetch_seconds: float = 10.0  # one download (servers with allow_image_urls)


LIMITS = ImageLimits()
Fetch = Callable[[str, str], bytes]  # (url, field) -> the bytes downloaded


@dataclass
class _Reading:
    """One request's images so far, and how it may download one."""

    fetch: Fetch | None = None
    images: int = 0
    pixels: int = 0
    seen: list[str] = field(default_factory=list)


_current = threading.local()


@contextlib.contextmanager
def reading(fetch: Fetch | None = None) -> Iterator[None]:
    """Count the images decoded in this thread as one request's; ``fetch`` downloads remote URLs (None: refused)."""
    previous = getattr(_current, "reading", None)
    _current.reading = _Reading(fetch)
    try:
        yield
    finally:
        _current.reading = previous


def _reading() -> _Reading:
    r = getattr(_current, "reading", None)
    return r if r is not None else _Reading()  # outside a request: this image alone


def in_body(body: dict, key: str) -> bool:
    """Whether the messages (or input items) under ``key`` hold an image part."""
    items = body.get(key)
    if not isinstance(items, list):
        return False
    for item in items:
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in PART_TYPES for p in content):
            return True
    return False


def _count(where: str) -> _Reading:
    r = _reading()
    if r.images >= LIMITS.max_images:
        raise InvalidParameterError(where, f"{where}: a request may hold at most {LIMITS.max_images} images")
    tick(where)  # the request's time budget for checks (the server's), between images
    return r


def _too_big(where: str, size: int) -> InvalidParameterError:
    return InvalidParameterError(where, f"{where} is {size:,} bytes; an image may be at most {LIMITS.max_bytes:,}")


def _pil(where: str) -> Any:
    """PIL's ``Image`` module: Pillow comes with the ``vision`` extra; without it an image is refused, saying so."""
    try:
        from PIL import Image as PIL
    except ImportError:
        raise InvalidParameterError(where, f"{where}: reading images needs Pillow, which comes with vision models' "
                                    "extra: pip install 'mlx_manager_nb[vision]'") from None
    return PIL


def decode(data: bytes, where: str) -> Image:
    """The image in ``data`` (PNG, JPEG, WebP or GIF: its first frame), checked; named ``where`` if refused."""
    PIL = _pil(where)
    from PIL import ImageOps

    r = _count(where)
    if len(data) > LIMITS.max_bytes:
        raise _too_big(where, len(data))
    try:
        with PIL.open(io.BytesIO(data), formats=FORMATS) as probe:  # reads the header only
            width, height = probe.size
            kind = probe.format or ""
    except PIL.DecompressionBombError:
        raise _too_many_pixels(where, None) from None
    except Exception:
        raise InvalidParameterError(where, f"{where} is not an image this server reads "
                                    f"({', '.join(FORMATS)})") from None
    _check_pixels(r, (width, height), where)
    try:
        with PIL.open(io.BytesIO(data), formats=FORMATS) as checked:
            checked.verify()  # a PNG's chunk checksums; a file cut short
        with PIL.open(io.BytesIO(data), formats=FORMATS) as img:
            img.load()  # the first frame of a GIF or an animated WebP
            rgb = _rgb(ImageOps.exif_transpose(img))
    except Exception as e:
        raise InvalidParameterError(where, f"{where} is not a readable {kind} image "
                                    f"({type(e).__name__}: {str(e)[:100]})") from None
    return _made(r, rgb, data, len(data), kind, where)


def _check_pixels(r: _Reading, size: tuple[int, int], where: str) -> None:
    """Refuse an image of ``size`` over the pixels of one image, or of the request's images together."""
    if size[0] * size[1] > LIMITS.max_pixels:
        raise _too_many_pixels(where, size)
    if r.pixels + size[0] * size[1] > LIMITS.request_pixels:
        raise InvalidParameterError(where, f"{where}: the request's images hold more than "
                                    f"{LIMITS.request_pixels:,} pixels together")


def _too_many_pixels(where: str, size: tuple[int, int] | None) -> InvalidParameterError:
    given = f"{size[0]:,} x {size[1]:,} pixels" if size else "far too many pixels"
    return InvalidParameterError(where, f"{where} is {given}; an image may hold at most {LIMITS.max_pixels:,}")


def _made(r: _Reading, rgb: Any, data: bytes, nbytes: int, kind: str, where: str) -> Image:
    r.images += 1
    r.pixels += rgb.width * rgb.height
    return Image(rgb, nbytes, hashlib.sha256(data).hexdigest(), where, kind)


def from_base64(text: Any, where: str) -> Image:
    """The image in base64 ``text``."""
    if not isinstance(text, str) or not text:
        raise InvalidParameterError(where, f"{where} must be a non-empty base64 string")
    if len(text) // 4 * 3 > LIMITS.max_bytes + 3:  # refused before decoding
        raise _too_big(where, len(text) // 4 * 3)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidParameterError(where, f"{where} is not valid base64") from None
    return decode(data, where)


def from_url(url: Any, where: str) -> Image:
    """The image a ``data:`` URL holds, or an ``http(s)`` URL points to (downloaded only where allowed)."""
    if not isinstance(url, str):
        raise InvalidParameterError(where, f"{where} must be a string (a data: URL)")
    match = DATA_URL.match(url)
    if match:
        if not match["type"].lower().startswith("image/"):
            raise InvalidParameterError(where, f"{where} is a data URL of {match['type'][:40]!r}, not of an image")
        return from_base64(url[match.end():], where)
    if url[:5].lower() == "data:":
        raise InvalidParameterError(where, f"{where} must be a base64 data URL (data:image/png;base64,...)")
    if url[:7].lower() == "http://" or url[:8].lower() == "https://":
        fetch = _reading().fetch
        if fetch is None:
            raise InvalidParameterError(where, f"{where}: this server does not download images (it was not "
                                        "started with allow_image_urls=True); send a data: URL or base64")
        _count(where)
        return decode(fetch(url, where), where)
    raise InvalidParameterError(where, f"{where} must be a data: URL (or an http(s) URL where the server "
                                "downloads images), got {!r}".format(url[:40]))


def from_python(value: Any, where: str) -> Image:
    """The image a Python caller gave: a PIL image, a NumPy array (H x W, or H x W x 3 or 4; uint8, or
    floats in 0..1), a path, a ``data:`` URL, bytes, or a matplotlib figure."""
    PIL = _pil(where)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode(bytes(value), where)
    if isinstance(value, str) and value[:5].lower() == "data:":
        return from_url(value, where)
    if isinstance(value, str) and value[:7].lower() in ("http://", "https:/"):
        raise InvalidParameterError(where, f"{where}: remote URLs are not downloaded; pass the image's bytes, "
                                    "a path or a PIL image")
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        if not path.is_file():
            raise InvalidParameterError(where, f"{where}: no image file {str(value)[:200]!r}")
        if path.stat().st_size > LIMITS.max_bytes:
            raise _too_big(where, path.stat().st_size)
        return decode(path.read_bytes(), where)
    if hasattr(value, "savefig"):  # a matplotlib figure, as it would show
        buf = io.BytesIO()
        value.savefig(buf, format="png")
        return decode(buf.getvalue(), where)
    if isinstance(value, PIL.Image):
        return _pixels(value, where)
    if hasattr(value, "__array_interface__") or type(value).__module__.split(".")[0] in ("numpy", "mlx"):
        return _pixels(_from_array(value, where), where)
    raise InvalidParameterError(where, f"{where} must be a PIL image, a NumPy array, a path, bytes or a "
                                f"matplotlib figure, not {type(value).__name__}")


def _from_array(value: Any, where: str) -> Any:
    import numpy as np

    PIL = _pil(where)
    a = np.asarray(value)
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or 0 in a.shape:
        raise InvalidParameterError(where, f"{where}: an image array is H x W, or H x W x 3 or 4; got shape "
                                    f"{tuple(a.shape)}")
    if a.shape[0] * a.shape[1] > LIMITS.max_pixels:
        raise _too_many_pixels(where, (a.shape[1], a.shape[0]))
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise InvalidParameterError(where, f"{where}: a float image array holds values in 0..1")
        a = (a * 255).round().astype(np.uint8)
    elif a.dtype != np.uint8:
        raise InvalidParameterError(where, f"{where}: an image array is uint8, or floats in 0..1; got {a.dtype}")
    return PIL.fromarray(np.ascontiguousarray(a))


def _pixels(img: Any, where: str) -> Image:
    """An image given as pixels: its digest is of its pixels (the bytes it came as are its RGB pixels)."""
    r = _count(where)
    _check_pixels(r, img.size, where)
    rgb = _rgb(img) if img.mode != "RGB" else img.copy()
    data = rgb.tobytes()
    return _made(r, rgb, f"{rgb.width}x{rgb.height}:".encode() + data, len(data), "pixels", where)


def _rgb(img: Any) -> Any:
    """``img`` in RGB; a transparent one over white, as transformers' image processors make it; a 16-bit
    grey one scaled to 8 bits (PIL's conversion clips its levels: 61% grey would be white)."""
    if img.mode.startswith("I"):  # a 16-bit grey PNG: "I;16" or "I", 0..65535
        import numpy as np
        from PIL import Image as PIL

        levels = np.asarray(img).astype(np.float32) / 257
        img = PIL.fromarray(levels.round().clip(0, 255).astype(np.uint8), "L")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        from PIL import Image as PIL

        over = PIL.new("RGBA", img.size, (255, 255, 255, 255))
        over.alpha_composite(img.convert("RGBA"))
        return over.convert("RGB")
    return img.convert("RGB")


def describe(image: Image) -> dict:
    """What an audit row's stored content says of an image: never its pixels."""
    return {"field": image.field, "format": image.format, "size": list(image.image.size), "bytes": image.nbytes,
            "sha256": image.digest}


def downloader(loop: asyncio.AbstractEventLoop) -> Fetch:
    """A ``fetch`` for :func:`reading`, run from a worker thread: downloads on ``loop`` with aiohttp, at
    most :attr:`ImageLimits.max_bytes` within :attr:`ImageLimits.fetch_seconds`."""

    def fetch(url: str, where: str) -> bytes:
        future = asyncio.run_coroutine_threadsafe(_download(url, where), loop)
        try:
            return future.result(LIMITS.fetch_seconds + 1)
        except concurrent.futures.TimeoutError:  # TimeoutError's alias from Python 3.11 on, not in 3.10
            future.cancel()
            raise InvalidParameterError(where, f"{where}: the download took more than "
                                        f"{LIMITS.fetch_seconds:g} s") from None

    return fetch


async def _download(url: str, where: str) -> bytes:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=LIMITS.fetch_seconds)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
            if response.status != 200:
                raise InvalidParameterError(where, f"{where}: the download answered HTTP {response.status}")
            data = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                data += chunk
                if len(data) > LIMITS.max_bytes:
                    raise InvalidParameterError(where, f"{where}: the download is over {LIMITS.max_bytes:,} "
                                                "bytes, the most an image may be")
            return bytes(data)
    except InvalidParameterError:
        raise
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        raise InvalidParameterError(where, f"{where}: the download failed ({type(e).__name__}: "
                                    f"{str(e)[:100]})") from None
