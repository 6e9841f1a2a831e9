"""Convert a llama-family GGUF file (llama.cpp's format) into an mlx-lm model folder."""

import json
import mmap
import re
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.utils import load_model
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .errors import InvalidModelError, ModelNotFoundError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama",)
GROUP_SIZE = 32  # the block size of Q4_0, Q4_1 and Q8_0, which mx.load keeps as its group size

# GGUF metadata value types: id -> struct format (8 is a string, 9 an array).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Supported ggml tensor types: id -> (name, elements per block, bytes per block).
_TENSOR_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34)}
# Names of common unsupported ggml types, for error messages.
_OTHER_TYPES = {
    6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
}

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

_GPT2_SPLIT = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
# llama.cpp's `tokenizer.ggml.pre` names -> the equivalent `tokenizers` pre-tokenizer.
_PRE_TOKENIZERS = {
    "default": _GPT2_SPLIT,
    "gpt-2": _GPT2_SPLIT,
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2_SPLIT]),
    "starcoder": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _GPT2_SPLIT]),
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def convert_gguf(
    gguf_path: Path, out_dir: Path, progress: Callable[[str, float], None] | None = None
) -> None:
    """Write an mlx-lm model folder (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json) converted from a GGUF file into out_dir (exists, empty)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    report = progress or (lambda stage, fraction: None)
    report("reading", 0.0)
    metadata, tensors = _read_header(gguf_path)
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{gguf_path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    names = {name: _mlx_name(gguf_path, name) for name in tensors}
    config = _model_config(gguf_path, metadata, tensors)
    report("tokenizer", 0.1)
    tokenizer, tokenizer_config = _tokenizer(gguf_path, metadata)
    report("converting", 0.25)
    try:
        raw: Any = mx.load(str(gguf_path))
    except (RuntimeError, ValueError) as e:
        raise InvalidModelError(f"{gguf_path}: cannot read the tensors: {e}") from e
    try:
        weights = _convert_weights(raw, names, config)
    except ValueError as e:
        raise InvalidModelError(f"{gguf_path}: the q/k tensors do not match the head counts: {e}") from e
    if quantization := _quantization(weights):
        config["quantization"] = quantization
    for role in ("bos", "eos"):
        if isinstance(token_id := metadata.get(f"tokenizer.ggml.{role}_token_id"), int):
            config[f"{role}_token_id"] = token_id

    report("writing", 0.8)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    try:
        mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    except RuntimeError as e:
        raise OSError(f"cannot write {out_dir / 'model.safetensors'}: {e}") from e
    try:  # mlx-lm's strict loader checks every tensor's shape against the config (lazily: cheap)
        load_model(out_dir, lazy=True)
    except (ValueError, RuntimeError) as e:
        raise InvalidModelError(f"{gguf_path}: the tensors do not match the llama.* metadata: {e}") from e
    report("done", 1.0)


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, list[int]]]]:
    """Parse and check a GGUF header: return its metadata and each tensor's ggml type name and
    dimensions (ggml order: the row length first).

    mx.load silently dequantizes types it does not keep quantized, so the types are read here.
    """
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise InvalidModelError(f"{path}: not a GGUF file (it does not start with 'GGUF')")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError as e:
        raise ModelNotFoundError(f"{path}: no such GGUF file") from e
    except OSError as e:
        raise InvalidModelError(f"{path}: cannot read the file: {e}") from e
    with buf:
        try:
            return _parse_header(path, buf)
        except InvalidModelError:
            raise
        except (struct.error, ValueError) as e:
            raise InvalidModelError(f"{path}: truncated or corrupt GGUF header ({e})") from e


def _parse_header(path: Path, buf: mmap.mmap) -> tuple[dict[str, Any], dict[str, tuple[str, list[int]]]]:
    pos = 4

    def take(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        if pos + n > len(buf):
            raise ValueError("a string runs past the end of the file")
        pos += n
        return buf[pos - n : pos].decode("utf-8", errors="replace")

    def value(kind: int) -> Any:
        nonlocal pos
        if kind == 6:  # float32: keep its shortest decimal form (1e-05, not 9.99999974e-06)
            return float(str(np.float32(take("<f"))))
        if kind in _SCALARS:
            return take(_SCALARS[kind])
        if kind == _STRING:
            return string()
        if kind != _ARRAY:
            raise ValueError(f"unknown metadata value type {kind}")
        item, count = take("<I"), take("<Q")
        if item in _SCALARS:
            dtype = np.dtype(_SCALARS[item])
            if pos + count * dtype.itemsize > len(buf):
                raise ValueError("an array runs past the end of the file")
            pos += count * dtype.itemsize
            return np.frombuffer(buf, dtype, count, pos - count * dtype.itemsize).tolist()
        return [value(item) for _ in range(count)]

    version = take("<I")
    if version not in (2, 3):
        raise UnsupportedModelError(f"{path}: GGUF version {version} is not supported (supported: 2, 3)")
    n_tensors, n_metadata = take("<Q"), take("<Q")
    metadata = {}
    for _ in range(n_metadata):
        key = string()
        metadata[key] = value(take("<I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        shape = [take("<Q") for _ in range(take("<I"))]
        infos.append((name, shape, take("<I"), take("<Q")))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise InvalidModelError(f"{path}: invalid general.alignment {alignment!r}")
    data_start = -(-pos // alignment) * alignment

    tensors = {}
    for name, shape, kind, offset in infos:
        if kind not in _TENSOR_TYPES:
            found = _OTHER_TYPES.get(kind, f"ggml type {kind}")
            supported = ", ".join(t[0] for t in _TENSOR_TYPES.values())
            raise UnsupportedModelError(
                f"{path}: tensor {name!r} has type {found}, which is not supported (supported: {supported})"
            )
        type_name, block, block_bytes = _TENSOR_TYPES[kind]
        end = data_start + offset + int(np.prod(shape)) // block * block_bytes
        if end > len(buf):
            raise InvalidModelError(
                f"{path}: truncated: tensor {name!r} ends at byte {end} but the file has {len(buf)} bytes"
            )
        tensors[name] = (type_name, shape)
    return metadata, tensors


def _mlx_name(path: Path, gguf_name: str) -> str:
    """Map a GGUF tensor name (`blk.3.attn_q.weight`) to mlx-lm's (`model.layers.3.self_attn.q_proj`)."""
    base, _, suffix = gguf_name.rpartition(".")
    layer = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if suffix == "weight" and base in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[base]
    if suffix == "weight" and layer and layer[2] in _LAYER_TENSORS:
        return f"model.layers.{layer[1]}.{_LAYER_TENSORS[layer[2]]}"
    known = [f"{n}.weight" for n in _GLOBAL_TENSORS] + [f"blk.N.{n}.weight" for n in _LAYER_TENSORS]
    raise UnsupportedModelError(
        f"{path}: tensor {gguf_name!r} is not supported (supported llama tensors: {', '.join(known)})"
    )


def _model_config(
    path: Path, metadata: dict[str, Any], tensors: dict[str, tuple[str, list[int]]]
) -> dict[str, Any]:
    """mlx-lm's llama config.json from the `llama.*` metadata."""

    def get(key: str, default: Any = None, kind: type | tuple[type, ...] = int) -> Any:
        value: Any = metadata.get(f"llama.{key}", default)
        if value is None:
            raise InvalidModelError(f"{path}: metadata key 'llama.{key}' is missing")
        of_kind = isinstance(value, kind) and not isinstance(value, bool)
        if not of_kind or value <= 0:
            raise InvalidModelError(f"{path}: metadata key 'llama.{key}' has an invalid value {value!r}")
        return value

    if metadata.get("llama.expert_count", 0):
        raise UnsupportedModelError(
            f"{path}: mixture-of-experts llama models ({metadata['llama.expert_count']} experts) are not supported"
        )
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UnsupportedModelError(
            f"{path}: RoPE scaling {scaling!r} is not supported (supported: none, linear)"
        )
    if "token_embd.weight" not in tensors:
        raise InvalidModelError(f"{path}: the token embedding 'token_embd.weight' is missing")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModelError(
            f"{path}: partial rotary embeddings (rope.dimension_count {get('rope.dimension_count')} "
            f"< head size {head_dim}) are not supported"
        )
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", kind=(int, float)),
        "rope_theta": get("rope.freq_base", 10000.0, kind=(int, float)),
        "max_position_embeddings": get("context_length"),
        "vocab_size": tensors["token_embd.weight"][1][1],
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": get("rope.scaling.factor", kind=(int, float))}
    return config


def _convert_weights(raw: dict[str, mx.array], names: dict[str, str], config: dict[str, Any]) -> dict[str, mx.array]:
    """Rename the tensors (quantized ones keep their `.scales`/`.biases`) and undo llama.cpp's q/k permutation."""
    weights = {}
    for key, array in raw.items():
        gguf_base, _, part = key.rpartition(".")
        name = names[f"{gguf_base}.weight"]
        if name.endswith("self_attn.q_proj"):
            array = _unpermute(array, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj"):
            array = _unpermute(array, config["num_key_value_heads"])
        weights[f"{name}.{part}"] = array
    return weights


def _unpermute(w: mx.array, n_head: int) -> mx.array:
    """Invert llama.cpp's row permutation of q/k (interleaved rotary pairs back to halves).

    Rows are independent, so this works on quantized weights, scales and biases alike.
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _quantization(weights: dict[str, mx.array]) -> dict[str, Any] | None:
    """mlx-lm's per-module quantization config: the commonest bit width, plus every module that differs."""
    bits = {
        key[: -len(".scales")]: weights[key.replace(".scales", ".weight")].shape[-1] // array.shape[-1]
        for key, array in weights.items()
        if key.endswith(".scales")
    }
    if not bits:
        return None
    default = Counter(bits.values()).most_common(1)[0][0]
    quantization: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default}
    quantization.update({m: {"group_size": GROUP_SIZE, "bits": b} for m, b in bits.items() if b != default})
    return quantization


def _tokenizer(path: Path, metadata: dict[str, Any]) -> tuple[Tokenizer, dict[str, Any]]:
    """A byte-level BPE `tokenizers.Tokenizer` and its tokenizer_config.json from `tokenizer.ggml.*`."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"{path}: tokenizer model {kind!r} is not supported (supported: 'gpt2' byte-level BPE)"
        )
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"{path}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(_PRE_TOKENIZERS)})"
        )
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise InvalidModelError(f"{path}: metadata key 'tokenizer.ggml.tokens' is missing")
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    types = metadata.get("tokenizer.ggml.token_type", [])
    try:
        tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    except Exception as e:  # tokenizers raises plain Exception
        raise InvalidModelError(f"{path}: the BPE vocabulary or merges are corrupt: {e}") from e
    tok.pre_tokenizer = _PRE_TOKENIZERS[pre]
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL]
    )
    tok.add_tokens(
        [AddedToken(tokens[i], normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED]
    )

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown")):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            config[f"{role}_token"] = tokens[token_id]
    if metadata.get("tokenizer.ggml.add_bos_token") and "bos_token" in config:
        bos, bos_id = config["bos_token"], metadata["tokenizer.ggml.bos_token_id"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
        )
    if "llama.context_length" in metadata:
        config["model_max_length"] = metadata["llama.context_length"]
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return tok, config
