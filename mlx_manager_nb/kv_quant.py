"""Quantized KV caches (``kv_bits`` 4 or 8) that join a running batch.

mlx-lm 0.32.2 quantizes KV caches only outside batches: ``generate``/``stream_generate`` turn a
``KVCache`` into a ``QuantizedKVCache`` once it holds ``quantized_kv_start`` tokens (default 5,000),
``QuantizedKVCache`` has no ``merge``, and ``mlx_lm.server`` stops batching when ``--kv-bits`` is
given. Here :class:`QuantizedKV` (mlx-lm's cache with a ``merge``) and :class:`BatchQuantizedKV`
(mlx-lm's ``BatchKVCache`` holding ``mx.quantize``'d keys and values: packed data, scales, biases)
keep continuous batching. A batch's layers must all be one kind, so a model loaded with ``kv_bits``
quantizes every sequence from its first token (``quantized_kv_start`` 0). mlx-lm's attention sees
the ``bits`` attribute and uses its quantized kernel, as for an unbatched cache.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache, make_prompt_cache

from .errors import InvalidParameterError

KV_BITS = (4, 8)
GROUP_SIZES = (64, 32)  # mx.quantize's, largest first (64 is mlx-lm's default); a head's width must divide by one

Quantized = tuple[mx.array, mx.array, mx.array]  # packed data, scales, biases


def group_size(model: Any, bits: int | None) -> int | None:
    """The quantization group for ``model``'s KV heads with ``bits`` (4 or 8, checked by ``Pool.load``; None:
    ``bits`` is None); refuses a model with a cache that cannot be quantized or heads too narrow."""
    if bits is None:
        return None
    cache = make_prompt_cache(model)
    if not all(type(c) is KVCache for c in cache):
        kinds = sorted({type(c).__name__ for c in cache} - {"KVCache"})
        raise InvalidParameterError("kv_bits", f"kv_bits: this model's caches ({', '.join(kinds)}) cannot be quantized")
    model(mx.array([[0]]), cache=cache)
    width = cache[0].keys.shape[-1]
    found = next((g for g in GROUP_SIZES if width % g == 0), None)
    if found is None:
        raise InvalidParameterError("kv_bits", f"kv_bits: the model's heads are {width} wide, not a multiple of 32")
    return found


def make_cache(model: Any, bits: int | None, group: int | None) -> list[Any]:
    """A fresh KV cache for one sequence of ``model``: quantized when ``bits`` is set."""
    if bits is None or group is None:
        return make_prompt_cache(model)
    return [QuantizedKV(group_size=group, bits=bits) for _ in model.layers]


class QuantizedKV(QuantizedKVCache):
    """mlx-lm's ``QuantizedKVCache`` that can join a batch (see :class:`BatchQuantizedKV`)."""

    def size(self) -> int:
        return self.offset

    def merge(self, caches: list[QuantizedKV]) -> BatchQuantizedKV:
        return BatchQuantizedKV.merge(caches)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else super().nbytes


def _map(fn: Any, q: Quantized) -> Quantized:
    return (fn(q[0]), fn(q[1]), fn(q[2]))


def _join(a: Quantized, b: Quantized, axis: int) -> Quantized:
    """``a`` and ``b`` concatenated part by part along ``axis``."""
    return (mx.concatenate([a[0], b[0]], axis), mx.concatenate([a[1], b[1]], axis), mx.concatenate([a[2], b[2]], axis))


class BatchQuantizedKV(BatchKVCache):
    """mlx-lm's ``BatchKVCache`` (left-padded rows, one per sequence) with quantized keys and values."""

    keys: Quantized | None  # type: ignore[assignment]
    values: Quantized | None  # type: ignore[assignment]

    def __init__(self, left_padding: list[int], group_size: int = 64, bits: int = 8):
        super().__init__(left_padding)
        self.group_size = group_size
        self.bits = bits

    def _empty(self, like: mx.array, steps: int) -> Quantized:
        B, H, _, D = like.shape
        per_word = 32 // self.bits
        return (mx.zeros((B, H, steps, D // per_word), dtype=mx.uint32),
                mx.zeros((B, H, steps, D // self.group_size), dtype=like.dtype),
                mx.zeros((B, H, steps, D // self.group_size), dtype=like.dtype))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Quantized, Quantized]:
        prev, n = self._idx, keys.shape[2]
        if self.keys is None or self.values is None or prev + n > self.keys[0].shape[2]:
            steps = (self.step + n - 1) // self.step * self.step
            new_k, new_v = self._empty(keys, steps), self._empty(values, steps)
            if self.keys is not None and self.values is not None:
                old_k, old_v = (_map(lambda x: x[..., :prev, :], q) for q in (self.keys, self.values))
                new_k, new_v = _join(old_k, new_k, 2), _join(old_v, new_v, 2)
            self.keys, self.values = new_k, new_v
        self.offset = self.offset + n
        self._idx += n
        for stored, new in ((self.keys, keys), (self.values, values)):
            parts = mx.quantize(new, group_size=self.group_size, bits=self.bits)
            for i in range(3):
                stored[i][..., prev: self._idx, :] = parts[i]
        return self.keys_and_values()

    def keys_and_values(self) -> tuple[Quantized, Quantized]:
        assert self.keys is not None and self.values is not None
        return (_map(lambda x: x[..., : self._idx, :], self.keys), _map(lambda x: x[..., : self._idx, :], self.values))

    def finalize(self) -> None:
        if self._right_padding is not None:
            from mlx_lm.models.cache import dynamic_roll

            shift = self._right_padding[:, None]
            assert self.keys is not None and self.values is not None
            self.keys, self.values = (_map(lambda x: dynamic_roll(x, shift, axis=2), q)
                                      for q in (self.keys, self.values))
            self.offset = self.offset - self._right_padding
            self.left_padding += self._right_padding
            self._right_padding = None

    def filter(self, batch_indices: Any) -> None:
        if self.keys is not None and self.values is not None:
            self.keys, self.values = (_map(lambda x: x[batch_indices], q) for q in (self.keys, self.values))
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift: Any = mx.min(self.left_padding).item() if self.left_padding.size else 0
        if shift > 0:
            if self.keys is not None and self.values is not None:
                self.keys, self.values = (_map(lambda x: x[..., shift:, :], q) for q in (self.keys, self.values))
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other: BatchQuantizedKV) -> None:
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        idx = max(self._idx, other._idx)
        size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)
        like = next(c for c in (self, other) if c.keys is not None and c.values is not None)
        like_k, like_v = like.keys, like.values
        assert like_k is not None and like_v is not None

        def pad(c: BatchQuantizedKV) -> tuple[Quantized, Quantized, mx.array, mx.array]:
            rows = c.offset.shape[0]
            k = c.keys if c.keys is not None else _map(lambda x: mx.zeros((rows, *x.shape[1:2], 0, x.shape[3]),
                                                                            x.dtype), like_k)
            v = c.values if c.values is not None else _map(lambda x: mx.zeros((rows, *x.shape[1:2], 0, x.shape[3]),
                                                                                x.dtype), like_v)
            left = idx - c._idx
            right = size - k[0].shape[2] - left
            if right < 0:
                k, v = (_map(lambda x, r=right: x[..., :r, :], q) for q in (k, v))
                right = 0
            if left or right:
                k, v = (_map(lambda x: mx.pad(x, [(0, 0), (0, 0), (left, right), (0, 0)]), q) for q in (k, v))
            return k, v, c.offset, c.left_padding + left

        (ka, va, oa, la), (kb, vb, ob, lb) = pad(self), pad(other)
        self.keys, self.values = _join(ka, kb, 0), _join(va, vb, 0)
        self.offset, self.left_padding = mx.concatenate([oa, ob]), mx.concatenate([la, lb])
        self._idx = idx

    def extract(self, idx: int) -> QuantizedKV:
        cache = QuantizedKV(group_size=self.group_size, bits=self.bits)
        assert self.keys is not None and self.values is not None
        padding: Any = self.left_padding[idx].item()
        keys, values = (_map(lambda x: mx.contiguous(x[idx: idx + 1, :, padding: self._idx]), q)
                        for q in (self.keys, self.values))
        cache.state = (keys, values, keys[0].shape[2], self.group_size, self.bits)
        return cache

    @classmethod
    def merge(cls, caches: list[QuantizedKV]) -> BatchQuantizedKV:
        group, bits = caches[0].group_size, caches[0].bits
        lengths = [c.offset for c in caches]
        longest = max(lengths)
        if longest == 0:
            return cls([0] * len(caches), group, bits)
        padding = [longest - n for n in lengths]
        like: Any = next(c for c in caches if c.keys is not None)

        def zeros(part: Quantized) -> Quantized:
            return _map(lambda x: mx.zeros((len(caches), x.shape[1], longest, x.shape[3]), x.dtype), part)

        keys, values = zeros(like.keys), zeros(like.values)
        for row, (p, c) in enumerate(zip(padding, caches, strict=True)):
            if c.keys is None:
                continue
            held_kv: Any = (c.keys, c.values)
            for stored, held in zip((keys, values), held_kv, strict=True):
                for i in range(3):
                    stored[i][row: row + 1, :, p: p + c.offset] = held[i][..., : c.offset, :]
        cache = cls(padding, group, bits)
        cache.keys, cache.values = keys, values
        cache.offset += longest
        cache._idx = longest
        return cache

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return sum(x.nbytes for q in (self.keys, self.values) for x in q)
