"""A BERT encoder in MLX with its pooling, and loading one from a model folder.

An embedding model is a folder with a BERT ``config.json``, ``tokenizer.json`` and safetensors
weights, plus (optionally) sentence-transformers' ``modules.json`` and ``1_Pooling/config.json``
(pooling, normalization) and ``sentence_bert_config.json`` (maximum length). A
``"matryoshka_dimensions": [...]`` list in ``config.json`` declares the shorter sizes the model was
trained to be truncated to. Module and parameter names follow Hugging Face's BertModel, so its
checkpoints load as they are.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from tokenizers import Tokenizer

from .errors import InvalidModelError
from .store import read_config

ENCODER_TYPES = ("bert",)
POOLING_FLAGS = {  # sentence-transformers' Pooling config keys
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "max": "pooling_mode_max_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
}


@dataclass(frozen=True)
class Spec:
    """How an encoder turns hidden states into one vector per text."""

    pooling: str  # a key of POOLING_FLAGS
    normalize: bool
    max_length: int  # tokens, special tokens included
    dimensions: int
    matryoshka: tuple[int, ...]
    vocab_size: int
    pad_id: int


class _SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        b, n, d = x.shape

        def split(t: mx.array) -> mx.array:
            return t.reshape(b, n, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(d // self.heads), mask=bias)
        return out.transpose(0, 2, 1, 3).reshape(b, n, d)


class _DenseNorm(nn.Module):
    def __init__(self, dims_in: int, dims_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(dims_in, dims_out)
        self.LayerNorm = nn.LayerNorm(dims_out, eps=eps)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        return self.LayerNorm(self.dense(x) + residual)


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, eps: float):
        super().__init__()
        self.self = _SelfAttention(hidden, heads)
        self.output = _DenseNorm(hidden, hidden, eps)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        return self.output(self.self(x, bias), x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)


class _Layer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        eps = c.get("layer_norm_eps", 1e-12)
        self.attention = _Attention(c["hidden_size"], c["num_attention_heads"], eps)
        self.intermediate = _Intermediate(c["hidden_size"], c["intermediate_size"])
        self.output = _DenseNorm(c["intermediate_size"], c["hidden_size"], eps)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        a = self.attention(x, bias)
        return self.output(nn.gelu(self.intermediate.dense(a)), a)


class _Embeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])
        self.token_type_embeddings = nn.Embedding(c.get("type_vocab_size", 2), c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c.get("layer_norm_eps", 1e-12))

    def __call__(self, ids: mx.array) -> mx.array:
        positions = mx.arange(ids.shape[1])[None]
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class _Encoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layer = [_Layer(c) for _ in range(c["num_hidden_layers"])]


class Bert(nn.Module):
    """A BERT encoder with its pooling: ``model(ids, mask)`` is one vector per row (not yet normalized)."""

    def __init__(self, config: dict, spec: Spec):
        super().__init__()
        self.spec = spec
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def __call__(self, ids: mx.array, mask: mx.array) -> mx.array:
        x = self.embeddings(ids)
        bias = ((1.0 - mask) * -1e9).astype(x.dtype)[:, None, None, :]
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return pool_hidden(x, mask, self.spec.pooling)


def pool_hidden(h: mx.array, mask: mx.array, mode: str) -> mx.array:
    """Pool hidden states ``(B, L, D)`` over the tokens ``mask`` (``(B, L)``, 1 or 0) keeps."""
    m = mask[..., None].astype(h.dtype)
    if mode == "cls":
        return h[:, 0]
    if mode == "max":
        return mx.where(m > 0, h, -1e9).max(axis=1)
    total, count = (h * m).sum(axis=1), m.sum(axis=1)
    if mode == "mean_sqrt_len":
        return total / mx.sqrt(count)
    return total / mx.maximum(count, 1e-9)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_spec(path: Path, config: dict | None = None) -> Spec:
    """The pooling, normalization and length limits a model folder declares (sentence-transformers' files)."""
    path = Path(path)
    config = config or read_config(path)
    modules = _read_json(path / "modules.json") or []
    types = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
    pooling = _read_json(path / types.get("Pooling", "1_Pooling") / "config.json")
    mode = next((mode for mode, flag in POOLING_FLAGS.items() if pooling.get(flag)), "mean")
    if pooling.get("pooling_mode_lasttoken") or pooling.get("pooling_mode_weightedmean_tokens"):
        raise InvalidModelError(f"{path}: only cls, mean, max and mean_sqrt_len pooling are supported")
    positions = config["max_position_embeddings"]
    max_length = min(_read_json(path / "sentence_bert_config.json").get("max_seq_length") or positions, positions)
    hidden = config["hidden_size"]
    return Spec(
        pooling=mode,
        normalize="Normalize" in types if modules else True,
        max_length=max_length,
        dimensions=hidden,
        matryoshka=tuple(sorted(d for d in config.get("matryoshka_dimensions", []) if d < hidden)),
        vocab_size=config["vocab_size"],
        pad_id=config.get("pad_token_id") or 0,
    )


def read(path: Path) -> tuple[dict, Spec, Tokenizer]:
    """An encoder folder's config, spec and tokenizer (no MLX work: any thread)."""
    path = Path(path)
    try:
        config = read_config(path)
        if config.get("model_type") not in ENCODER_TYPES:
            raise InvalidModelError(f"{path}: embedding models of type {config.get('model_type')!r} are not "
                                    f"supported (supported: {', '.join(ENCODER_TYPES)})")
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        tokenizer.no_truncation()  # sentence-transformers' tokenizer.json often pads and truncates to 128
        tokenizer.no_padding()
        return config, read_spec(path, config), tokenizer
    except InvalidModelError:
        raise
    except Exception as e:  # JSON and tokenizers errors mean a bad folder
        raise InvalidModelError(f"cannot load {path}: {e}") from None


def build(path: Path, config: dict, spec: Spec) -> Bert:
    """The encoder with its weights read lazily (on the thread that will evaluate them)."""
    try:
        model = Bert(config, spec)
        weights: dict[str, mx.array] = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            loaded: Any = mx.load(str(f))
            weights.update({k.removeprefix("bert."): v for k, v in loaded.items()})
        flat: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
        wanted = [k for k, _ in flat]
        missing = [k for k in wanted if k not in weights]
        if missing:
            raise InvalidModelError(f"{path} lacks {len(missing)} weights of a BERT encoder, e.g. {missing[0]}")
        model.load_weights([(k, weights[k].astype(mx.float32)) for k in wanted])
    except InvalidModelError:
        raise
    except Exception as e:  # shapes and safetensors errors mean a bad folder
        raise InvalidModelError(f"cannot load {path}: {e}") from None
    return model
