"""Quantized KV caches (``kv_bits``) on a tiny model whose heads are 64 wide: batched, budgeted, on disk."""

import concurrent.futures

import mlx.core as mx
import pytest

from mlx_manager_nb import kv_disk
from mlx_manager_nb.errors import InvalidParameterError
from mlx_manager_nb.kv_quant import QuantizedKV
from mlx_manager_nb.shared_prefix import fork

LONG = [{"role": "user", "content": " ".join(f"item {i} is blue." for i in range(80))}]  # over 1,024 tokens
SHORT = [[{"role": "user", "content": text}] for text in ("Hello!", "What is the capital of France?",
                                                           "def add(a, b): return a + b. " * 4)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("heads64") / "tiny-64", hidden_size=256,
                            max_position_embeddings=4096)


def reference(pool, name, messages, bits, max_tokens):
    """Greedy tokens of one sequence alone, with mlx-lm's ``QuantizedKVCache`` from the first token."""
    runner = pool.engine.runner(name)
    prompt = runner.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def run():
        cache = [QuantizedKV(group_size=64, bits=bits) for _ in runner.model.layers]
        tokens, step = [], mx.array([prompt])
        for _ in range(max_tokens):
            token = mx.argmax(runner.model(step, cache=cache)[0, -1]).item()
            if token in runner.tokenizer.eos_token_ids:
                break
            tokens.append(token)
            step = mx.array([[token]])
        return runner.tokenizer.decode(tokens)

    return pool.engine.run(run).result()


@pytest.mark.parametrize("bits", [4, 8])
def test_concurrent_requests_decode_in_one_batch_as_each_would_alone(make_pool, model, bits):
    pool = make_pool(keep_alive=None, kv_disk_bytes=0)
    pool.load(model, alias="q", kv_bits=bits)
    with concurrent.futures.ThreadPoolExecutor(len(SHORT)) as threads:
        answers = list(threads.map(lambda m: pool.chat(m, temperature=0, max_tokens=12), SHORT))
    assert [a.text for a in answers] == [reference(pool, "tiny-64", m, bits, 12) for m in SHORT]
    again = pool.chat(SHORT[1], temperature=0, max_tokens=12)  # from the prompt cache
    assert again.usage.cached_tokens > 0 and again.text == answers[1].text
    assert pool.models()[0].kv_bits == bits


def test_the_kv_budget_counts_quantized_bytes(make_pool, model):
    from mlx_manager_nb import engine

    held, per_token = {}, {}
    for bits in (None, 8, 4):
        pool = make_pool(keep_alive=None, kv_disk_bytes=0)
        pool.load(model, alias="q", kv_bits=bits)
        pool.chat(LONG, temperature=0, max_tokens=4)
        held[bits] = pool.models()[0].cache_bytes
        per_token[bits] = pool.engine.run(engine._kv_bytes_per_token, pool.engine.runner("tiny-64")).result()
        pool.close()
    # float32 keys and values: 32 bits a value; 8 bits take 9 with a group's scale and bias, 4 bits take 5
    assert per_token[8] == per_token[None] * 9 // 32 and per_token[4] == per_token[None] * 5 // 32
    assert held[8] < held[None] * 0.3 and held[4] < held[8] * 0.6


def test_a_quantized_cache_comes_back_from_disk_in_a_folder_of_its_own(make_pool, model, isolated_home):
    first = make_pool(keep_alive=None)
    first.load(model, alias="q", kv_bits=8)
    one = first.chat(LONG, temperature=0, max_tokens=8)
    first.close()
    (saved,) = (isolated_home / "kv").glob("*/*.safetensors")
    assert saved.parent.name == kv_disk.fingerprint(model) + "-kv8"
    second = make_pool(keep_alive=None)
    second.load(model, alias="q", kv_bits=8)
    two = second.chat(LONG, temperature=0, max_tokens=8)
    (info,) = second.models()
    assert two.usage.cached_tokens >= one.usage.prompt_tokens - 1 and two.text == one.text and info.disk_hits == 1
    second.close()
    full = make_pool(keep_alive=None)  # full precision never reads a quantized file
    full.load(model, alias="q")
    assert full.chat(LONG, temperature=0, max_tokens=8).usage.cached_tokens == 0


def test_kv_bits_other_than_4_or_8_narrow_heads_or_a_loaded_model_are_refused(make_pool, model, tiny_model_path):
    pool = make_pool(keep_alive=None)
    with pytest.raises(InvalidParameterError, match="4 or 8"):
        pool.load(model, kv_bits=3)
    with pytest.raises(InvalidParameterError, match="16 wide"):
        pool.load(tiny_model_path, kv_bits=8)
    assert pool.models() == []
    pool.load(model, alias="q", kv_bits=8)
    with pytest.raises(InvalidParameterError, match="unload it"):
        pool.load(model, kv_bits=4)


@pytest.mark.parametrize("queries", [1, 96])
def test_attention_over_a_quantized_cache_equals_mlx_lms_quantized_kernel(queries):
    """Prompts' chunks dequantize the keys for the tiled attention (the quantized kernel is 15x slower on a
    CPU); decoding steps keep mlx-lm's kernel: either way the same attention, within float rounding."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    from mlx_manager_nb.attention import scaled_dot_product_attention

    cache = QuantizedKV(group_size=64, bits=8)
    keys, values = cache.update_and_fetch(mx.random.normal((1, 2, 300, 64)), mx.random.normal((1, 2, 300, 64)))
    q = mx.random.normal((1, 4, queries, 64))
    mask = "causal" if queries > 1 else None
    ours = scaled_dot_product_attention(q * 1, keys, values, cache, scale=0.125, mask=mask)  # (scaled in place)
    theirs = quantized_scaled_dot_product_attention(q * 1, keys, values, scale=0.125, mask=mask, group_size=64,
                                                    bits=8)
    assert mx.allclose(ours, theirs, atol=1e-4).item()


def test_concurrent_requests_sharing_a_long_prefix_answer_as_each_would_alone(make_pool, model, monkeypatch):
    """They prefill their shared system prompt once (see shared_prefix), from copies of one quantized cache."""
    from mlx_manager_nb import engine

    forked = []
    monkeypatch.setattr(engine, "fork", lambda *a: forked.append(a[0][0]) or fork(*a))
    system = {"role": "system", "content": " ".join(f"Rule {i}: be kind." for i in range(30))}
    asks = [[system, {"role": "user", "content": q}] for q in ("First rule?", "Last rule?", "Why?")]
    pool = make_pool(keep_alive=None, kv_disk_bytes=0)
    pool.load(model, alias="q", kv_bits=8)
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as threads:
        answers = list(threads.map(lambda m: pool.chat(m, temperature=0, max_tokens=12), asks))
    assert [a.text for a in answers] == [reference(pool, "tiny-64", m, 8, 12) for m in asks]
    assert forked and all(isinstance(c, QuantizedKV) for c in forked)
