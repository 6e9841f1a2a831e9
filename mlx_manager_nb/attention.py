"""Causal attention for long prompts on CPUs, in tiles of queries, so prefill stops slowing down as n².

On CPU devices ``mx.fast.scaled_dot_product_attention`` computes the whole score matrix of a
prefill chunk (heads x queries x all keys, the masked half included) and passes over it several
times, and most of its time is ``exp``: MLX's CPU ``exp`` is scalar (40-85 M/s on this machine,
where numpy's vectorised one does ~700 M/s). :func:`causal_attention` takes the queries a tile at
a time against only the keys they can see (half the work of a causal prompt), so a tile's scores
stay small, and takes the softmax's exponentials with numpy; outputs equal the reference within
float32 rounding. The fast exp belongs in MLX's CPU backend (a vectorised ``exp``); until it is
there, this is the workaround. :func:`install` makes mlx-lm's model modules use it on CPU devices;
Metal keeps the fused kernel, and ``MLX_NB_ATTENTION=reference`` keeps mlx-lm's everywhere.
``benchmarks/prefill.py`` measures it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models import base

#: Queries per tile: 64 to 512 measured within noise of each other on two shared cores; smaller
#: tiles keep a tile's scores (3 x 128 x 6,000 floats per key head) nearer the caches.
TILE = 128
#: Below this many query rows the reference is used (decoding steps, short drafts): at 3,000 keys
#: the two are even up to 16 rows, and tiling wins from 32 (34 ms against 39 per layer).
MIN_QUERIES = 32
#: Prompt tokens per prefill forward pass (mlx-lm's default). With tiled attention a chunk's
#: attention work no longer grows with its size, and 768 to 2,048 measured within noise of each
#: other at 3,000 tokens (best single figure 2,048); 512 and 3,072 were slower once
#: (benchmarks/prefill.py --chunks).
PREFILL_CHUNK = 2048

_reference = base.scaled_dot_product_attention
_last_mask: tuple[Any, bool] | None = None  # (mask, sees no key beyond the causal line): one check per forward pass


def causal_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                     mask: mx.array | None = None) -> mx.array:
    """Causal attention of the last ``L`` of ``N`` positions, a tile of queries at a time.

    Shapes as mlx-lm's: queries (B, H, L, D), keys and values (B, H_kv, N, D) with H a multiple of
    H_kv (grouped-query heads share keys without copying them). Query ``i`` sees keys ``0..N-L+i``;
    ``mask`` (boolean or additive, broadcastable to (B, H, L, N)) may hide more, such as padding.
    """
    B, H, L, D = queries.shape
    kv_heads, N = keys.shape[1], keys.shape[2]
    rep = H // kv_heads
    q = (queries * scale).reshape(B, kv_heads, rep, L, D)
    k_t = keys.swapaxes(-1, -2)
    grouped = None if mask is None else _grouped(mask, kv_heads, L, N)
    outs = []
    for start in range(0, L, TILE):
        end = min(start + TILE, L)
        rows, seen = end - start, N - L + end  # the tile's last query sees keys 0..seen-1
        tile = q[:, :, :, start:end].reshape(B, kv_heads, rep * rows, D)
        scores = (tile @ k_t[..., :seen]).reshape(B, kv_heads, rep, rows, seen)
        if grouped is None:
            scores = mx.where(mx.arange(seen)[None] > mx.arange(N - L + start, seen)[:, None], -mx.inf, scores)
        elif grouped.dtype == mx.bool_:
            # as the reference: a row that sees no key (padding) averages values instead of giving NaN
            scores = mx.where(grouped[..., start:end, :seen], scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + grouped[..., start:end, :seen]
        weights, sums = _exp_rows(scores)
        out = (weights.reshape(B, kv_heads, rep * rows, seen) @ values[:, :, :seen]).reshape(B, kv_heads, rep, rows, -1)
        outs.append((out / sums).astype(queries.dtype))
    return mx.concatenate(outs, axis=3).reshape(B, H, L, -1)


def _exp_rows(scores: mx.array) -> tuple[mx.array, mx.array]:
    """``exp(scores - row max)`` and its row sums (the softmax before its division), in float32.

    The exponentials are numpy's: its vectorised ``exp`` runs ~20x faster than MLX's scalar CPU one
    here, and they are most of a tile's work. This evaluates the scores (prefill is evaluated chunk
    by chunk anyway)."""
    e = np.array(scores.astype(mx.float32))
    np.subtract(e, e.max(axis=-1, keepdims=True), out=e)
    np.exp(e, out=e)
    return mx.array(e), mx.array(e.sum(axis=-1, keepdims=True))


def _grouped(mask: mx.array, kv_heads: int, L: int, N: int) -> mx.array:
    """A mask broadcastable to (B, H, L, N) as (B, H_kv, H / H_kv, L, N), the queries' grouping."""
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    mask = mx.broadcast_to(mask, (*mask.shape[:2], L, N))
    if mask.shape[1] == 1:
        return mx.expand_dims(mask, 2)
    return mask.reshape(mask.shape[0], kv_heads, mask.shape[1] // kv_heads, L, N)


def _is_causal(mask: mx.array, L: int, N: int) -> bool:
    """Whether an array mask hides every key after each query's own position (mlx-lm's causal masks,
    with padding or a sliding window, do). Evaluated once per mask: the layers of a forward pass
    share it."""
    global _last_mask
    last = _last_mask
    if last is not None and last[0] is mask:
        return last[1]
    visible = mask if mask.dtype == mx.bool_ else mask > -1e9
    after = mx.arange(N)[None] > mx.arange(N - L, N)[:, None]
    causal = not mx.any(visible & after).item()
    _last_mask = (mask, causal)
    return causal


def scaled_dot_product_attention(queries, keys, values, cache, scale: float, mask, sinks=None) -> mx.array:
    """mlx-lm's ``scaled_dot_product_attention``, tiled where the prompt is long and the mask causal."""
    if hasattr(cache, "bits"):  # quantized keys and values (packed data, scales, biases), see kv_quant
        if queries.shape[2] < MIN_QUERIES or sinks is not None:  # decoding: mlx-lm's quantized kernel is quicker
            return _reference(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
        # a prompt's chunk: its quantized kernel took 7.4 s a layer (512 queries, 4,000 keys) where dequantizing
        # them for the tiles took 0.5 s; the float copies last one layer's attention
        keys, values = (mx.dequantize(q[0], q[1], q[2], cache.group_size, cache.bits) for q in (keys, values))
        cache = None  # for the reference below: the keys and values are plain arrays now
    L, N = queries.shape[2], keys.shape[2]
    tiled = (L >= MIN_QUERIES and sinks is None
             and queries.shape[1] % keys.shape[1] == 0
             and (mask == "causal" if isinstance(mask, str) else
                  isinstance(mask, mx.array) and 2 <= mask.ndim <= 4 and _is_causal(mask, L, N)))
    if not tiled:
        return _reference(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    return causal_attention(queries, keys, values, scale, None if isinstance(mask, str) else mask)


def install() -> bool:
    """Point mlx-lm's loaded model modules at :func:`scaled_dot_product_attention` on CPU devices, or
    back at mlx-lm's own where ``MLX_NB_ATTENTION=reference`` is set or the device is a GPU.

    Called when a model is loaded (its module imported), so each load follows the switch as it is
    then. Returns whether the tiled attention is in use.
    """
    tiled = os.environ.get("MLX_NB_ATTENTION") != "reference" and mx.default_device().type == mx.DeviceType.cpu
    ours = scaled_dot_product_attention
    for name, module in list(sys.modules.items()):
        if name.startswith("mlx_lm.models.") and getattr(module, "scaled_dot_product_attention", None) in (
                _reference, ours):
            module.scaled_dot_product_attention = ours if tiled else _reference  # type: ignore[attr-defined]
    return tiled
