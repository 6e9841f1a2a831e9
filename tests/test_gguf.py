"""GGUF import: the tiny model written as llama.cpp would, converted back, must behave like the original."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from gguf_writer import TYPE_IDS, write_gguf, write_tiny_gguf
from mlx.utils import tree_flatten
from mlx_lm import load, stream_generate

from mlx_manager_nb.errors import InvalidModelError, ModelNotFoundError, UnsupportedModelError
from mlx_manager_nb.gguf import convert_gguf

TEXTS = ["The capital of France is Paris.", "def add(a, b):\n    return a + b", "<|im_start|>user\nhi<|im_end|>"]


def convert(model_dir, tmp_path, **writer_args):
    """Write the model as GGUF, convert it, and return (converted folder, weights as stored)."""
    gguf, out = tmp_path / "model.gguf", tmp_path / "out"
    out.mkdir()
    stored = write_tiny_gguf(model_dir, gguf, **writer_args)
    convert_gguf(gguf, out)
    return out, stored


def greedy(model, tokenizer) -> list[int]:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=20)]


def map_parameters(model, fn) -> None:
    """Replace each parameter `v` named `k` by `fn(k, v)`."""
    model.load_weights([(k, fn(k, v)) for k, v in tree_flatten(model.parameters())])


def config_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize(
    ("writer_args", "dtype"),
    [({"with_mlx": True}, mx.float32), ({"weight_type": "F16"}, mx.float16)],
    ids=["f32-mx.save_gguf", "f16"],
)
def test_float_round_trip(tiny_model_path, tmp_path, writer_args, dtype):
    out, _ = convert(tiny_model_path, tmp_path, **writer_args)
    model, tokenizer = load(str(out))
    reference, ref_tokenizer = load(str(tiny_model_path))
    map_parameters(reference, lambda k, v: v.astype(dtype) if v.ndim == 2 else v)

    tokens = greedy(model, tokenizer)
    assert len(tokens) == 20
    assert tokens == greedy(reference, ref_tokenizer)
    for text in TEXTS:
        assert tokenizer.encode(text) == ref_tokenizer.encode(text)
    assert tokenizer.decode(tokenizer.encode(TEXTS[1])) == TEXTS[1]
    assert tokenizer.chat_template == ref_tokenizer.chat_template
    assert tokenizer.eos_token_ids == ref_tokenizer.eos_token_ids
    assert "quantization" not in config_of(out)


def test_q4_1_round_trip_matches_nn_quantize(tiny_model_path, tmp_path):
    out, _ = convert(tiny_model_path, tmp_path, weight_type="Q4_1")
    model, tokenizer = load(str(out))
    reference, ref_tokenizer = load(str(tiny_model_path))
    nn.quantize(reference, group_size=32, bits=4)
    # GGUF keeps a block's scale and minimum as float16.
    map_parameters(reference, lambda k, v: v.astype(mx.float16) if k.endswith((".scales", ".biases")) else v)

    assert config_of(out)["quantization"] == {"group_size": 32, "bits": 4}
    assert greedy(model, tokenizer) == greedy(reference, ref_tokenizer)


def test_mixed_q8_0_q4_0_round_trip(tiny_model_path, tmp_path):
    """llama.cpp's symmetric types, 8-bit embedding and 4-bit rest (as in SmolLM2's Q4 file)."""
    out, stored = convert(tiny_model_path, tmp_path, weight_type="Q4_0", embedding_type="Q8_0")
    model, tokenizer = load(str(out))
    reference, ref_tokenizer = load(str(tiny_model_path))
    reference.load_weights([(k, mx.array(v)) for k, v in stored.items()])

    assert config_of(out)["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    # Not bit-exact: mlx dequantizes with float16 scales and biases (Q8_0 becomes (q + 128) * d - 128 * d).
    prompt = mx.array([tokenizer.encode(TEXTS[0])])
    logits, expected = model(prompt), reference(prompt)
    assert mx.abs(logits - expected).max() < 0.02 * mx.abs(expected).max()
    assert greedy(model, tokenizer) == greedy(reference, ref_tokenizer)


def test_add_bos_token_and_progress(tiny_model_path, tmp_path):
    gguf, out = tmp_path / "model.gguf", tmp_path / "out"
    out.mkdir()
    write_tiny_gguf(tiny_model_path, gguf, metadata={"tokenizer.ggml.add_bos_token": True})
    stages = []
    convert_gguf(gguf, out, progress=lambda stage, fraction: stages.append((stage, fraction)))
    _, tokenizer = load(str(out))
    assert tokenizer.encode("hi")[0] == tokenizer.bos_token_id
    assert stages[0] == ("reading", 0.0) and stages[-1] == ("done", 1.0)
    assert [f for _, f in stages] == sorted(f for _, f in stages)


@pytest.mark.parametrize("cut", ["header", "tensors"])
def test_truncated_file(tiny_model_path, tmp_path, cut):
    gguf = tmp_path / "model.gguf"
    write_tiny_gguf(tiny_model_path, gguf)
    data = gguf.read_bytes()
    gguf.write_bytes(data[:200] if cut == "header" else data[:-100])
    (tmp_path / "out").mkdir()
    with pytest.raises(InvalidModelError, match="truncated") as error:
        convert_gguf(gguf, tmp_path / "out")
    assert type(error.value) is InvalidModelError
    assert str(gguf) in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such GGUF file"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x00" * 100, b'{"not": "gguf"}'])
def test_not_gguf(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(InvalidModelError, match="not a GGUF file") as error:
        convert_gguf(path, tmp_path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"llama.block_count": None}, "'llama.block_count' is missing"),
        ({"llama.attention.head_count": "four"}, "'llama.attention.head_count' has an invalid value 'four'"),
        ({"llama.feed_forward_length": 256}, "the tensors do not match the llama.\\* metadata"),
    ],
)
def test_bad_metadata(tiny_model_path, tmp_path, metadata, message):
    gguf, out = tmp_path / "model.gguf", tmp_path / "out"
    out.mkdir()
    write_tiny_gguf(tiny_model_path, gguf, metadata=metadata)
    with pytest.raises(InvalidModelError, match=message) as error:
        convert_gguf(gguf, out)
    assert type(error.value) is InvalidModelError


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"general.architecture": "bert"}, "architecture 'bert' is not supported .supported: llama"),
        ({"tokenizer.ggml.model": "llama"}, "tokenizer model 'llama' is not supported .supported: 'gpt2'"),
        ({"tokenizer.ggml.pre": "qwen2"}, "pre-tokenizer 'qwen2' is not supported .supported: default, gpt-2"),
        ({"llama.expert_count": 8}, "mixture-of-experts"),
        ({"llama.rope.scaling.type": "yarn"}, "RoPE scaling 'yarn' is not supported"),
    ],
)
def test_unsupported_metadata(tiny_model_path, tmp_path, metadata, message):
    gguf = tmp_path / "model.gguf"
    write_tiny_gguf(tiny_model_path, gguf, metadata=metadata)
    with pytest.raises(UnsupportedModelError, match=message) as error:
        convert_gguf(gguf, tmp_path)
    assert str(gguf) in str(error.value)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (("token_embd.weight", 14, [256, 2], bytes(420)), "'token_embd.weight' has type Q6_K, .* .supported: F32, F16"),
        (("rope_freqs.weight", TYPE_IDS["F32"], [32], bytes(128)), "tensor 'rope_freqs.weight' is not supported"),
    ],
    ids=["Q6_K", "rope_freqs"],
)
def test_unsupported_tensor(tmp_path, tensor, message):
    name, *spec = tensor
    gguf = tmp_path / "model.gguf"
    write_gguf(gguf, {"general.architecture": "llama"}, {name: tuple(spec)})
    with pytest.raises(UnsupportedModelError, match=message):
        convert_gguf(gguf, tmp_path)
