"""Write the tiny test model as a GGUF file laid out as llama.cpp writes it.

mx.save_gguf cannot write quantized tensors (nor uint8/uint32 ones), so a minimal GGUF v3
writer here encodes Q4_0, Q4_1 and Q8_0 blocks following ggml's definitions.
"""

import json
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8}
_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))])
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])
_GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _string(s: str) -> bytes:
    data = s.encode()
    return struct.pack("<Q", len(data)) + data


def _value(v) -> tuple[int, bytes]:
    """(GGUF value type, encoding): bool, uint32, float32, string, or an array of int32 or strings."""
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return 4, struct.pack("<I", v)
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        return 8, _string(v)
    if all(isinstance(x, str) for x in v):
        return 9, struct.pack("<IQ", 8, len(v)) + b"".join(_string(x) for x in v)
    return 9, struct.pack("<IQ", 5, len(v)) + np.asarray(v, "<i4").tobytes()


def write_gguf(path: Path, metadata: dict, tensors: dict[str, tuple[int, list[int], bytes]]) -> None:
    """Write a GGUF v3 file; tensors maps a name to (ggml type id, ggml dims (row length first), data)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
    for key, v in metadata.items():
        kind, data = _value(v)
        out += _string(key) + struct.pack("<I", kind) + data
    offset, blobs = 0, []
    for name, (kind, dims, data) in tensors.items():
        out += _string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", kind, offset)
        blob = data + bytes(-len(data) % 32)
        blobs.append(blob)
        offset += len(blob)
    out += bytes(-len(out) % 32)
    Path(path).write_bytes(bytes(out) + b"".join(blobs))


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """ggml's 4-bit layout: byte j holds element j in its low nibble and element j+16 in its high one."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def _q4_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    groups = w.reshape(w.shape[0], -1, 32)
    extreme = np.take_along_axis(groups, np.abs(groups).argmax(-1)[..., None], -1)
    d = (extreme / -8).astype(np.float16)
    q = np.clip(np.round(groups / d + 8), 0, 15).astype(np.uint8)
    blocks = np.zeros(groups.shape[:2], _Q4_0)
    blocks["d"], blocks["qs"] = d[..., 0], _pack_nibbles(q)
    return blocks, ((q - 8.0) * d.astype(np.float32)).reshape(w.shape)


def _q8_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    groups = w.reshape(w.shape[0], -1, 32)
    d = (np.abs(groups).max(-1, keepdims=True) / 127).astype(np.float16)
    q = np.clip(np.round(groups / d), -127, 127).astype(np.int8)
    blocks = np.zeros(groups.shape[:2], _Q8_0)
    blocks["d"], blocks["qs"] = d[..., 0], q
    return blocks, (q * d.astype(np.float32)).reshape(w.shape)


def _q4_1(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_1 is MLX's affine 4-bit quantization (group 32) with float16 scales and biases."""
    wq, scales, biases = mx.quantize(mx.array(w), group_size=32, bits=4)
    packed = np.array(wq).view(np.uint8)
    q = np.stack([packed & 15, packed >> 4], -1).reshape(w.shape[0], -1, 32)
    blocks = np.zeros(q.shape[:2], _Q4_1)
    blocks["d"], blocks["m"], blocks["qs"] = np.array(scales), np.array(biases), _pack_nibbles(q)
    d, m = blocks["d"].astype(np.float32)[..., None], blocks["m"].astype(np.float32)[..., None]
    return blocks, (q * d + m).reshape(w.shape)


_ENCODERS = {
    "F32": lambda w: (w.astype("<f4"), w.astype(np.float32)),
    "F16": lambda w: (w.astype("<f2"), w.astype(np.float16).astype(np.float32)),
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q8_0": _q8_0,
}


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert script: reorder each head's rows for interleaved (GPT-J style) RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_metadata(model_dir: Path) -> dict:
    """The llama.* and tokenizer.ggml.* metadata llama.cpp would write for the tiny model."""
    config = json.loads((model_dir / "config.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = dict(tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]})
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    metadata = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "general.alignment": 32,
        "llama.context_length": config["max_position_embeddings"],
        "llama.embedding_length": config["hidden_size"],
        "llama.block_count": config["num_hidden_layers"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.rope.dimension_count": config["hidden_size"] // config["num_attention_heads"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config["num_key_value_heads"],
        "llama.attention.layer_norm_rms_epsilon": config["rms_norm_eps"],
        "llama.rope.freq_base": config["rope_theta"],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t in special else 1 for t in tokens],
        "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": vocab[tok_config["bos_token"]],
        "tokenizer.ggml.eos_token_id": vocab[tok_config["eos_token"]],
        "tokenizer.ggml.padding_token_id": vocab[tok_config["pad_token"]],
        "tokenizer.ggml.unknown_token_id": vocab[tok_config["unk_token"]],
        "tokenizer.ggml.add_bos_token": False,
    }
    if "chat_template" in tok_config:
        metadata["tokenizer.chat_template"] = tok_config["chat_template"]
    return metadata


def write_tiny_gguf(
    model_dir: Path,
    path: Path,
    weight_type: str = "F32",
    embedding_type: str | None = None,
    metadata: dict | None = None,
    with_mlx: bool = False,
) -> dict[str, np.ndarray]:
    """Write the tiny mlx-lm model at model_dir as a GGUF file at path.

    2-D weights are stored as weight_type (the token embedding as embedding_type, default the
    same), norms as F32. metadata entries override the generated ones (None removes a key).
    with_mlx writes with mx.save_gguf (float types only). Returns the weights, by mlx-lm name,
    as they are after the round trip through the stored type (dequantized, float32).
    """
    config = json.loads((model_dir / "config.json").read_text())
    meta = {k: v for k, v in {**tiny_metadata(model_dir), **(metadata or {})}.items() if v is not None}
    stored, tensors = {}, {}
    for name, w in mx.load(str(model_dir / "model.safetensors")).items():
        w = np.array(w, dtype=np.float32)
        kind = "F32" if w.ndim == 1 else (embedding_type or weight_type) if "embed" in name else weight_type
        blocks, stored[name] = _ENCODERS[kind](w)
        if "q_proj" in name or "k_proj" in name:
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            blocks = permute_qk(blocks, heads)
        module = name.removesuffix(".weight")
        if module.startswith("model.layers."):
            _, _, layer, sub = module.split(".", 3)
            module = f"blk.{layer}.{_GGUF_NAMES[sub]}"
        else:
            module = _GGUF_NAMES[module]
        tensors[module + ".weight"] = (kind, w.shape, blocks)
    if with_mlx:
        mx.save_gguf(str(path), {n: mx.array(b) for n, (_, _, b) in tensors.items()}, _mlx_metadata(meta))
    else:
        write_gguf(path, meta, {n: (TYPE_IDS[k], list(s[::-1]), b.tobytes()) for n, (k, s, b) in tensors.items()})
    return stored


def _mlx_metadata(metadata: dict) -> dict:
    """The metadata as mx.save_gguf takes it: numbers and number lists as mx.array."""
    converted = {}
    for key, v in metadata.items():
        if isinstance(v, bool):
            v = mx.array(v)
        elif isinstance(v, int):
            v = mx.array(v, dtype=mx.uint32)
        elif isinstance(v, float):
            v = mx.array(v, dtype=mx.float32)
        elif isinstance(v, list) and not all(isinstance(x, str) for x in v):
            v = mx.array(v, dtype=mx.int32)
        converted[key] = v
    return converted
