"""Tiled attention for long prompts on CPUs equals mlx-lm's, and the pool's greedy output does not change."""

import mlx.core as mx
import pytest
from mlx_lm.models import base, llama
from mlx_lm.models.base import create_causal_mask

from mlx_manager_nb import attention

TOL = 1e-5


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 queries, used from 2 query rows: tiny shapes cross several tiles and a ragged last one."""
    monkeypatch.setattr(attention, "TILE", 4)
    monkeypatch.setattr(attention, "MIN_QUERIES", 2)


def qkv(batch: int, heads: int, kv_heads: int, queries: int, keys: int):
    key = mx.random.key(queries * 100 + keys)
    q, k, v = (mx.random.normal(shape, key=mx.random.split(key, 3)[i]) for i, shape in enumerate(
        ((batch, heads, queries, 8), (batch, kv_heads, keys, 8), (batch, kv_heads, keys, 8))))
    return q, k, v


def both(q, k, v, mask):
    reference = base.scaled_dot_product_attention(q, k, v, None, scale=0.35, mask=mask)
    tiled = attention.scaled_dot_product_attention(q, k, v, None, scale=0.35, mask=mask)
    return reference, tiled


@pytest.mark.parametrize("queries, keys", [(7, 7), (13, 13), (9, 30), (1, 5)])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (4, 1)])
def test_causal_attention_equals_the_reference(small_tiles, queries, keys, heads, kv_heads):
    """The "causal" string and the boolean and additive causal arrays mlx-lm builds, with a prompt
    cache (queries are the last of the keys) and grouped-query heads."""
    q, k, v = qkv(2, heads, kv_heads, queries, keys)
    causal = create_causal_mask(queries, keys - queries)
    for mask in ("causal", causal, causal[None, None], mx.where(causal, 0.0, -mx.inf),
                 create_causal_mask(queries, keys - queries, window_size=3)):
        reference, tiled = both(q, k, v, mask)
        assert mx.allclose(reference, tiled, atol=TOL).item()


def test_padded_batches_equal_the_reference_where_a_row_sees_a_key(small_tiles):
    """A batch's padding (mlx-lm's BatchKVCache masks): rows that see no key at all are padding, whose
    output nothing reads; the reference averages all values there, the tiles those before it."""
    q, k, v = qkv(2, 6, 2, 10, 14)
    mask = create_causal_mask(10, 4, left_padding=mx.array([0, 6]))
    reference, tiled = both(q, k, v, mask)
    sees = mx.any(mask, axis=-1, keepdims=True)  # (2, 1, 10, 1)
    assert mx.all(mx.isfinite(tiled)).item()
    assert mx.allclose(mx.where(sees, reference, 0.0), mx.where(sees, tiled, 0.0), atol=TOL).item()
    assert not mx.all(sees).item()  # the case is really there


def test_a_mask_that_shows_later_keys_gets_the_reference(small_tiles):
    """Tiles skip the keys after each query, so an array mask that shows them (bidirectional parts)
    must not be tiled."""
    q, k, v = qkv(1, 4, 2, 9, 9)
    mask = create_causal_mask(9) | ((mx.arange(9)[:, None] == 2) & (mx.arange(9)[None] == 7))
    reference, tiled = both(q, k, v, mask)
    assert mx.allclose(reference, tiled, atol=TOL).item()


def test_long_prompts_equal_the_reference_at_the_real_tile():
    q, k, v = qkv(1, 9, 3, 300, 350)
    reference, tiled = both(q, k, v, "causal")
    assert mx.allclose(reference, tiled, atol=TOL).item()


def test_the_switch_keeps_mlx_lms_attention(monkeypatch):
    assert attention.install() == (mx.default_device().type == mx.DeviceType.cpu)
    monkeypatch.setenv("MLX_NB_ATTENTION", "reference")
    assert attention.install() is False
    assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention
    monkeypatch.delenv("MLX_NB_ATTENTION")
    if attention.install():
        assert llama.scaled_dot_product_attention is attention.scaled_dot_product_attention


def test_greedy_output_through_the_pool_is_the_same_with_either_attention(make_pool, tiny_model_path,
                                                                          small_tiles, monkeypatch):
    """Prompts long enough to be tiled, a second turn reusing the first's prompt cache, and two at once."""
    prompts = ["The capital of France is Paris. " * 6, "def add(a, b):\n    return a + b\n" * 5]

    def outputs():
        pool = make_pool(keep_alive=None)
        pool.load(tiny_model_path, alias="tiny")
        first = [pool.complete(p, max_tokens=12, temperature=0).text for p in prompts]
        again = pool.complete(prompts[0] + first[0] + " Rome", max_tokens=12, temperature=0).text
        streams = [pool.complete(p, stream=True, max_tokens=12, temperature=0) for p in prompts]
        together = ["".join(s) for s in streams]
        return first, again, together

    tiled = outputs()
    monkeypatch.setenv("MLX_NB_ATTENTION", "reference")
    assert outputs() == tiled
    monkeypatch.delenv("MLX_NB_ATTENTION")
    attention.install()
