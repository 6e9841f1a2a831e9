"""Vision-language models of the Idefics3 family (SmolVLM): the image encoder, its loading, and image prompts.

A model folder of ``model_type`` ``idefics3`` (or ``smolvlm``) holds a SigLIP vision tower, a connector
(pixel shuffle and one projection) and a llama text model, in Hugging Face's names
(``model.vision_model.*``, ``model.connector.*``, ``model.text_model.*``, ``lm_head``) or mlx-community's
(``vision_model.*``, ``connector.*``, ``language_model.*``). The text model is mlx-lm's own llama, so
the engine's batching, KV caches and prompt cache serve it as any chat model; the tower and connector
(:class:`Vision`) hang under it as ``model.vision``, so its weights load, count and evaluate with it.
transformers' ``Idefics3Processor`` (no torch needed) templates, resizes and tiles images on the
caller's thread: each tile becomes ``image_seq_len`` ``<image>`` tokens of the prompt.

The architecture follows Hugging Face's Idefics3 (Apache-2.0) and mlx-vlm's MLX port of it
(``mlx_vlm/models/idefics3``, MIT License, Copyright (c) 2024 Prince Canuma), written anew here.

An image request's engine prompt holds **keys** where its image tokens are: ids past the vocabulary,
derived from a hash of each tile's pixels and the token's place in it. The prompt cache, shared prefixes
and the disk tier then tell two images apart (every image's ``<image>`` ids are the same) and reuse the
KV of the same image; :class:`ImagePrompt` keeps the real ids and the tiles. On the engine thread
:func:`encode` runs the tower over the tiles the cache does not hold, in slices (a layer's rows in
pieces sized to the slice), then the prefill feeds the text model the token embeddings with the image
features in place of the ``<image>`` ones (mlx-lm llama's ``input_embeddings``).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama

from .errors import InvalidModelError
from .request import ChatRequest, Image, Text, ToolResult
from .slices import pause
from .store import read_config

VISION_TYPES = ("idefics3", "smolvlm")
KEY_SPACE = 1 << 30  # image keys are vocab_size + a hash below this (a prompt's ids stay int32)
# Hugging Face's Idefics3VisionConfig defaults, for the keys a folder's vision_config leaves out
VISION_DEFAULTS = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 16,
                   "num_channels": 3, "image_size": 224, "patch_size": 32, "layer_norm_eps": 1e-6}
MIN_ROWS = 4  # patch rows of an encoder piece before its speed is known, and the fewest (later ones fit the slice)


def vision_config(config: dict) -> dict:
    """A model's vision tower settings, Hugging Face's defaults filling what its config leaves out."""
    return {**VISION_DEFAULTS, **config.get("vision_config", {})}


def is_vision(path: Path) -> bool:
    """Whether the folder at ``path`` is a vision-language model this module loads."""
    return read_config(path).get("model_type") in VISION_TYPES


# -- the vision tower and connector --------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(hidden, hidden) for _ in range(4))

    def split(self, x: mx.array) -> mx.array:
        t, n, _ = x.shape
        return x.reshape(t, n, self.heads, -1).transpose(0, 2, 1, 3)


class _MLP(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, inner), nn.Linear(inner, hidden)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.gelu_approx(self.fc1(x)))  # SigLIP's gelu_pytorch_tanh


class _Layer(nn.Module):
    """A pre-norm encoder layer, computable a slice of its rows at a time: every row's keys and values
    first (:meth:`keys_values`), then any rows' outputs (:meth:`rows`)."""

    def __init__(self, c: dict):
        super().__init__()
        hidden, eps = c["hidden_size"], c["layer_norm_eps"]
        self.self_attn = _Attention(hidden, c["num_attention_heads"])
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = _MLP(hidden, c["intermediate_size"])
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)

    def keys_values(self, x: mx.array) -> tuple[mx.array, mx.array]:
        h = self.layer_norm1(x)
        return self.self_attn.split(self.self_attn.k_proj(h)), self.self_attn.split(self.self_attn.v_proj(h))

    def rows(self, x: mx.array, keys: mx.array, values: mx.array, bias: mx.array | None) -> mx.array:
        a = self.self_attn
        q = a.split(a.q_proj(self.layer_norm1(x)))
        o = mx.fast.scaled_dot_product_attention(q, keys, values, scale=1 / math.sqrt(q.shape[-1]), mask=bias)
        h = x + a.out_proj(o.transpose(0, 2, 1, 3).reshape(x.shape))
        return h + self.mlp(self.layer_norm2(h))

    def __call__(self, x: mx.array, bias: mx.array | None) -> mx.array:
        return self.rows(x, *self.keys_values(x), bias)


class _Embeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        patch, hidden = c["patch_size"], c["hidden_size"]
        self.patch_embedding = nn.Conv2d(c["num_channels"], hidden, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Embedding((c["image_size"] // patch) ** 2, hidden)

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        x = self.patch_embedding(pixels)  # (tiles, h, w, hidden)
        return x.reshape(x.shape[0], -1, x.shape[-1]) + self.position_embedding(positions)


class _Encoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layers = [_Layer(c) for _ in range(c["num_hidden_layers"])]


class _Tower(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.embeddings = _Embeddings(c)
        self.encoder = _Encoder(c)
        self.post_layernorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])


class _Projection(nn.Module):
    def __init__(self, dims_in: int, dims_out: int):
        super().__init__()
        self.proj = nn.Linear(dims_in, dims_out, bias=False)


class _Connector(nn.Module):
    def __init__(self, scale: int, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.scale = scale
        self.modality_projection = _Projection(vision_hidden * scale * scale, text_hidden)

    def __call__(self, x: mx.array) -> mx.array:
        """Pixel shuffle: each ``scale`` x ``scale`` block of patches becomes one token, then the projection."""
        t, n, d = x.shape
        side, s = math.isqrt(n), self.scale
        x = x.reshape(t, side, side // s, d * s).transpose(0, 2, 1, 3)
        x = x.reshape(t, side // s, side // s, d * s * s).transpose(0, 2, 1, 3)
        return self.modality_projection.proj(x.reshape(t, n // (s * s), d * s * s))


class Vision(nn.Module):
    """The vision tower and connector: tiles in, one text-model embedding per image token out."""

    def __init__(self, config: dict):
        super().__init__()
        v, t = vision_config(config), config["text_config"]
        self.vision_model = _Tower(v)
        self.connector = _Connector(config.get("scale_factor", 2), v["hidden_size"], t["hidden_size"])

    def __call__(self, pixels: mx.array, positions: mx.array, bias: mx.array | None = None) -> mx.array:
        """All at once (``encode`` runs the same in slices): ``(tiles, seq_len, text hidden)``."""
        tower = self.vision_model
        x = tower.embeddings(pixels, positions)
        for layer in tower.encoder.layers:
            x = layer(x, bias)
        return self.connector(tower.post_layernorm(x))


# -- loading -----------------------------------------------------------------------------------------


def _rename(key: str) -> str | None:
    """A checkpoint weight's name in our tree (the llama model with ``vision`` under it); None: not a weight."""
    if "position_ids" in key or "rotary_emb.inv_freq" in key:
        return None
    key = key.removeprefix("model.") if key.startswith(("model.vision_model.", "model.connector.",
                                                         "model.text_model.")) else key
    if key.startswith(("vision_model.", "connector.")):
        return "vision." + key
    for prefix in ("text_model.", "language_model."):
        if key.startswith(prefix):
            key = key.removeprefix(prefix)
            return key if key.startswith(("model.", "lm_head.")) else "model." + key
    return key


def make(config: dict) -> llama.Model:
    """The text model with the vision tower and connector under it (``model.vision``), weights random."""
    text = dict(config["text_config"], model_type="llama")
    text.setdefault("vocab_size", config.get("vocab_size"))
    model = llama.Model(llama.ModelArgs.from_dict(text))
    model.vision = Vision(config)
    return model


def build(path: Path, config: dict) -> llama.Model:
    """:func:`make` with the folder's weights, read lazily (on the thread that will evaluate them)."""
    try:
        model = make(config)
        weights: dict[str, mx.array] = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            loaded: Any = mx.load(str(f))
            weights.update({name: v for k, v in loaded.items() if (name := _rename(k)) is not None})
        conv = "vision.vision_model.embeddings.patch_embedding.weight"
        if conv in weights and weights[conv].shape[1] == vision_config(config)["num_channels"]:
            weights[conv] = weights[conv].transpose(0, 2, 3, 1)  # PyTorch's (out, in, kh, kw): MLX's (out, kh, kw, in)
        if model.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        quantization = config.get("quantization")
        if quantization:
            nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                        class_predicate=lambda p, m: f"{p}.scales" in weights)
        model.load_weights(list(weights.items()))
    except Exception as e:  # shapes, names and safetensors errors mean a bad folder
        raise InvalidModelError(f"cannot load {path}: {e}") from None
    return model


@dataclass(frozen=True)
class Processor:
    """A vision model's prompt maker: transformers' Idefics3 processor, and what the engine needs of it."""

    processor: Any
    image_token_id: int
    seq_len: int  # image tokens per tile
    vocab_size: int
    patch: int


def read_processor(path: Path, splitting: bool) -> Processor:
    """The folder's processor (any thread); ``splitting``: images larger than one tile are cut into tiles plus
    a global one (else each image is one tile)."""
    import transformers

    config = read_config(path)
    try:  # its class, not AutoProcessor's choice: importing mlx-vlm registers its own there, without the template
        kind = "SmolVLMProcessor" if config.get("model_type") == "smolvlm" else "Idefics3Processor"
        processor = getattr(transformers, kind).from_pretrained(str(path))
        processor.image_processor.do_image_splitting = splitting
        processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
                                      add_generation_prompt=True)
    except Exception as e:
        raise InvalidModelError(f"cannot load {path}: its processor or chat template fails "
                                f"({type(e).__name__}: {str(e)[:200]})") from None
    v = vision_config(config)
    seq_len = (v["image_size"] // v["patch_size"]) ** 2 // config.get("scale_factor", 2) ** 2
    if processor.image_seq_len != seq_len:
        raise InvalidModelError(f"{path}: processor_config's image_seq_len {processor.image_seq_len} does not match "
                                f"the vision config's {seq_len} tokens per tile")
    vocab = config["text_config"].get("vocab_size") or config["vocab_size"]
    return Processor(processor, config["image_token_id"], seq_len, vocab, v["patch_size"])


# -- image prompts -----------------------------------------------------------------------------------


@dataclass(eq=False)
class ImagePrompt:
    """An image request's prompt as the engine runs it: real ids, tiles, and the image features once encoded."""

    ids: list[int]  # the prompt's real token ids (the engine's prompt holds keys where these are <image>)
    pixels: np.ndarray  # (tiles, height, width, 3) float32, normalized
    positions: np.ndarray  # (tiles, patches) int32: each patch's position embedding
    valid: np.ndarray  # (tiles, patches) bool: patches of the image (False: padding)
    starts: list[int]  # where each tile's image tokens begin in the prompt
    seq_len: int
    image_token_id: int
    vocab_size: int  # keys are this or more
    features: dict[int, mx.array] = field(default_factory=dict)  # tile -> its (seq_len, hidden) features

    @property
    def end(self) -> int:
        """The prompt position after its last image token."""
        return self.starts[-1] + self.seq_len

    def release(self) -> None:
        """Drop the tiles and their features, once the prompt's KV cache holds what they gave."""
        self.features.clear()
        self.pixels = self.pixels[:0]

    def real_ids(self, processor: Callable[[mx.array, mx.array], mx.array]) -> Callable[[mx.array, mx.array], mx.array]:
        """A logits processor fed the token ids it would see with the real ``<image>`` ids in place of the keys."""
        def process(tokens: mx.array, logits: mx.array) -> mx.array:
            return processor(mx.where(tokens >= self.vocab_size, self.image_token_id, tokens), logits)

        return process

    def embeddings(self, model: Any, start: int, end: int) -> mx.array:
        """The text model's input embeddings of prompt tokens ``start:end``, image features in place."""
        h = model.model.embed_tokens(mx.array(self.ids[start:end]))
        for t, s in enumerate(self.starts):
            a, b = max(start, s), min(end, s + self.seq_len)
            if a < b:
                h[a - start:b - start] = self.features[t][a - s:b - s].astype(h.dtype)
        return h[None]


def _patches(mask: np.ndarray, patch: int) -> np.ndarray:
    """Which patches of a tile hold image pixels (the processor's pixel mask, (H, W) bool)."""
    h, w = mask.shape[0] // patch, mask.shape[1] // patch
    return mask[:h * patch, :w * patch].reshape(h, patch, w, patch).any(axis=(1, 3)).reshape(-1)


def _positions(valid: np.ndarray, side: int) -> np.ndarray:
    """Idefics3's position ids for a tile's patches: the image's own grid bucketed onto the full one."""
    grid = valid.reshape(side, side)
    rows, cols = max(int(grid[:, 0].sum()), 1), max(int(grid[0].sum()), 1)
    bounds = np.arange(1 / side, 1.0, 1 / side)
    bucket_h = np.searchsorted(bounds, np.arange(0, 1 - 1e-6, 1 / rows), side="right")
    bucket_w = np.searchsorted(bounds, np.arange(0, 1 - 1e-6, 1 / cols), side="right")
    out = np.zeros(side * side, np.int32)
    out[valid] = (bucket_h[:, None] * side + bucket_w[None, :]).reshape(-1)[:int(valid.sum())]
    return out


def _keys(pixels: np.ndarray, valid: np.ndarray, seq_len: int, vocab: int) -> list[int]:
    """A tile's image-token keys: ids past the vocabulary from a hash of its pixels, one per token."""
    digest = hashlib.blake2b(pixels.tobytes() + valid.tobytes(), digest_size=16).digest()
    return [vocab + int.from_bytes(hashlib.blake2b(digest + i.to_bytes(4, "little"), digest_size=8).digest(),
                                   "little") % KEY_SPACE for i in range(seq_len)]


def _content(parts: tuple) -> list[dict]:
    """A turn's parts as Idefics3's template takes them (a list it indexes, never empty: a call shows as nothing)."""
    content = [{"type": "image"} if isinstance(p, Image) else {"type": "text", "text": p.content}
               if isinstance(p, ToolResult) else {"type": "text", "text": p.text} for p in parts
               if isinstance(p, (Image, Text, ToolResult))]
    return content or [{"type": "text", "text": ""}]


def _tiles(p: Any, text: str, images: tuple[Image, ...]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The prompt's ids, tiles (tiles, height, width, 3) and their pixel masks, as the processor makes them for
    ``text`` and ``images``, each image cut into tiles unless its ``detail`` is "low" or the pool cuts none (its
    ``image_splitting``: the operator's bound on the encode's cost, which a client's "high" does not lift). The
    processor cuts all of a call's images alike: each is processed alone, its tiles padded as it pads them."""
    splitting = p.image_processor.do_image_splitting
    alone = [p.image_processor([[i.image]], return_tensors="np", return_row_col_info=True,
                               do_image_splitting=splitting and i.detail != "low") for i in images]
    tiles = [np.asarray(a["pixel_values"][0], np.float32) for a in alone]
    height, width = max(t.shape[2] for t in tiles), max(t.shape[3] for t in tiles)
    pixels = np.zeros((sum(len(t) for t in tiles), height, width, 3), np.float32)
    masks = np.zeros(pixels.shape[:3], bool)
    n = 0
    for t, a in zip(tiles, alone, strict=True):
        mask = a.get("pixel_attention_mask")
        pixels[n:n + len(t), :t.shape[2], :t.shape[3]] = t.transpose(0, 2, 3, 1)
        masks[n:n + len(t), :t.shape[2], :t.shape[3]] = np.asarray(mask[0], bool) if mask is not None else True
        n += len(t)
    grid = {"rows": [[a["rows"][0][0] for a in alone]], "cols": [[a["cols"][0][0] for a in alone]]}
    pieces = text.split(p.image_token)
    text = pieces[0] + "".join(p.replace_image_token(grid, k) + piece for k, piece in enumerate(pieces[1:]))
    return [int(t) for t in p.tokenizer([text])["input_ids"][0]], pixels, masks


def prompt(processor: Processor, request: ChatRequest) -> tuple[list[int], ImagePrompt | None]:
    """A chat's engine prompt and, when it holds images, its :class:`ImagePrompt` (any thread but the engine's:
    resizing and tiling take time proportional to the images)."""
    p = processor.processor
    text = p.apply_chat_template([{"role": m.role, "content": _content(m.parts)} for m in request.messages],
                                 add_generation_prompt=True)
    if not request.images:
        return [int(t) for t in p(text=[text], return_tensors="np")["input_ids"][0]], None
    ids, pixels, masks = _tiles(p, text, request.images)
    where = [i for i, t in enumerate(ids) if t == processor.image_token_id]
    n = processor.seq_len
    starts = where[::n]
    if len(where) != len(pixels) * n or any(where[i * n + n - 1] != s + n - 1 for i, s in enumerate(starts)):
        raise InvalidModelError(f"the processor made {len(where)} image tokens for {len(pixels)} tiles of {n} tokens")
    side = pixels.shape[1] // processor.patch
    valid = np.stack([_patches(m, processor.patch) for m in masks])
    keys = list(ids)
    for t, s in enumerate(starts):
        keys[s:s + processor.seq_len] = _keys(pixels[t], valid[t], processor.seq_len, processor.vocab_size)
    positions = np.stack([_positions(v, side) for v in valid])
    return keys, ImagePrompt(ids, pixels, positions, valid, starts, n, processor.image_token_id, processor.vocab_size)


# -- encoding on the engine thread -------------------------------------------------------------------


def encode(model: Any, image: ImagePrompt, first: int, budget: float,
           alive: Callable[[], bool]) -> Generator[None, float, float]:
    """Encode the tiles whose image tokens reach past prompt position ``first`` (those before it are in the KV
    cache), a piece of an encoder layer's rows at a time, each sized to what is left of the slice's ``budget``;
    stops early when ``alive()`` turns false. Returns the budget of the next slice (an engine job's part)."""
    tiles = [t for t, s in enumerate(image.starts) if s + image.seq_len > first and t not in image.features]
    if not tiles or not alive():
        return budget
    tower = model.vision.vision_model
    start = time.perf_counter()
    x = tower.embeddings(mx.array(image.pixels[tiles]), mx.array(image.positions[tiles]))
    valid = image.valid[tiles]
    bias = None if valid.all() else mx.array(np.where(valid, 0.0, -np.inf)[:, None, None, :], x.dtype)
    mx.eval(x)
    n = x.shape[1]
    per_row: dict[str, float | None] = {"keys": None, "out": None}  # seconds a row (a row's outputs cost more)
    for layer in tower.encoder.layers:
        parts: dict[str, list[mx.array]] = {"keys": [], "values": [], "out": []}
        for phase in ("keys", "out"):
            done = 0
            while done < n:
                cost = per_row[phase]
                start, budget = yield from pause(start, budget, MIN_ROWS * (cost or 0.0))
                if not alive():
                    return budget
                piece = time.perf_counter()
                left = budget - (piece - start)  # a piece fits what is left of the slice
                chunk = x[:, done:done + (MIN_ROWS if cost is None else max(MIN_ROWS, int(left / cost)))]
                if phase == "keys":
                    k, v = layer.keys_values(chunk)
                    mx.eval(k, v)
                    parts["keys"].append(k)
                    parts["values"].append(v)
                else:
                    keys, values = parts["keys"], parts["values"]
                    out = layer.rows(chunk, keys[0], values[0], bias)
                    mx.eval(out)
                    parts["out"].append(out)
                done += chunk.shape[1]
                per_row[phase] = (time.perf_counter() - piece) / chunk.shape[1]
            if phase == "keys":
                parts["keys"] = [mx.concatenate(parts["keys"], axis=2)]
                parts["values"] = [mx.concatenate(parts["values"], axis=2)]
        x = mx.concatenate(parts["out"], axis=1)
    features = model.vision.connector(tower.post_layernorm(x))
    mx.eval(features)
    for i, t in enumerate(tiles):
        image.features[t] = features[i]
    return (yield)  # the prefill after it starts a slice of its own

