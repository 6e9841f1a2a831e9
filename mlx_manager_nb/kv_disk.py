"""The prompt cache's disk tier: long prefixes' KV caches kept under ``$MLX_NB_HOME/kv/``, across restarts.

A finished sequence of :data:`MIN_TOKENS` tokens or more has its KV copied to host memory in slices
between decode steps (MLX arrays stay on the engine thread) and written, off the engine thread, to
``kv/<model fingerprint>/<hash of its tokens>.safetensors``, its tokens in the file's metadata. The
fingerprint hashes the names, sizes and modification times of the model folder's files: a model
changed under the same name gets a new folder and never reads a stale cache. A prompt the memory tier
(mlx-lm's ``LRUPromptCache``) misses is looked up here by longest common prefix; the file is read off
the engine thread and its arrays are made on it, in slices. The folder is bounded in bytes (least recently
used files go first, across models); files are written to a temporary name and renamed, so a reader
(another kernel sharing the home) never sees half a file; a corrupt or truncated file is removed and
counts as a miss. A disk that is full or read-only stops the writes with one warning; serving goes on.
Plain ``KVCache`` layers are stored, and quantized ones (a model loaded with ``kv_bits``, see
:mod:`.kv_quant`: packed data, scales and biases, in a folder of their own, ``<fingerprint>-kv8``);
rotating and recurrent caches are not (their state is not a prefix that can be cut at any token).
Writes happen as a long entry enters the memory tier (write-through: a crash or a kernel restart
keeps it, and no eviction waits for a write), and again as one leaves it (mlx-lm's LRU dropping it to keep
its 16 entries or its byte share) if it is no longer on disk (its file deleted or trimmed meanwhile);
entries shorter than :data:`MIN_TOKENS` are not written (a warm-up's are, whatever their length).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from .kv_quant import QuantizedKV
from .slices import Job, pause
from .store import home, make_private_dir

MIN_TOKENS = 1024  # a finished sequence this long (prompt and answer) is written to disk
KV_DISK_BYTES = 2 << 30  # default bound of the kv/ folder, all models together
_DTYPES = {mx.bfloat16: ("BF16", np.uint16), mx.float16: ("F16", np.float16), mx.float32: ("F32", np.float32)}
_MX = {name: (dtype, np_dtype) for dtype, (name, np_dtype) in {**_DTYPES, mx.uint32: ("U32", np.uint32)}.items()}
_MX_NAMES = {dtype: name for name, (dtype, _) in _MX.items()}

Arrays = dict[str, tuple[str, np.ndarray]]  # name -> its safetensors dtype and its data (bfloat16 as uint16)


def fingerprint(model_path: Path) -> str:
    """A model folder's identity: its files' names, sizes and modification times, hashed."""
    h = hashlib.sha256()
    for f in sorted(p for p in model_path.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def root() -> Path:
    """The disk tier's folder, all models together (made on the first write)."""
    return home() / "kv"


class DiskTier:
    """One model's folder in the disk tier (see the module's docstring); ``max_bytes`` bounds the whole kv/ folder."""

    def __init__(self, model_path: Path, max_bytes: int = KV_DISK_BYTES, kv_bits: int | None = None):
        self.root = root()  # made on the first write, owner-only like the home
        self.folder = self.root / (fingerprint(model_path) + (f"-kv{kv_bits}" if kv_bits else ""))
        self.max_bytes = max_bytes
        self.hits = 0
        self._lock = threading.Lock()
        self._index: dict[str, tuple[int, ...]] = {}  # file name -> its tokens
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-kv-disk")
        self._writable = True
        self._copies: dict[object, Job] = {}  # save's jobs still copying a cache to host memory
        self._seen: int | None = None  # the folder's modification time when last indexed
        self._scan()

    def _scan(self) -> None:
        """Index the files written since the last look (by this kernel or another sharing the home), and
        forget those removed; nothing to do while the folder is unchanged."""
        try:
            seen = os.stat(self.folder).st_mtime_ns
            if seen == self._seen:
                return
            names = {f.name for f in self.folder.glob("*.safetensors")}
        except OSError:  # no folder yet, or deleted: reads of what the index still names are misses
            return
        self._seen = seen
        with self._lock:
            known = set(self._index)
        for name in names - known:
            try:
                tokens = tuple(json.loads(_header(self.folder / name)["__metadata__"]["tokens"]))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError):
                _remove(self.folder / name)
                continue
            with self._lock:
                self._index[name] = tokens
        with self._lock:
            for name in known - names:
                self._index.pop(name, None)

    @property
    def nbytes(self) -> int:
        """Bytes of this model's files."""
        return sum(_size(self.folder / name) for name in list(self._index))

    def find(self, tokens: list[int]) -> tuple[str, int] | None:
        """The file sharing the longest prefix with ``tokens``, and that prefix's length (any thread)."""
        self._scan()
        with self._lock:
            entries = list(self._index.items())
        best = max(((name, common_prefix(stored, tokens)) for name, stored in entries), key=lambda e: e[1],
                   default=None)
        return best if best and best[1] else None

    def save(self, tokens: list[int], cache: list[Any], keep: bool = False) -> Job | None:
        """An engine job storing ``cache`` (holding ``tokens``) if long enough (``keep``: whatever its length)
        and not stored yet, else None (engine thread). It copies the KV to host memory (MLX arrays stay on
        the engine thread), as many layers per slice as its time allows, then writes it in the background."""
        if not self._writable or self.max_bytes <= 0 or (len(tokens) < MIN_TOKENS and not keep):
            return None
        if not all(_storable(c) and c.offset == len(tokens) for c in cache):
            return None
        found = self.find(tokens)
        if found and found[1] == len(tokens):  # this prefix, or a longer one holding it, is stored
            return None
        key = object()
        job = self._copies[key] = self._copy(key, list(tokens), cache)
        return job

    def _copy(self, key: object, tokens: list[int], cache: list[Any]) -> Job:
        budget = yield
        try:
            arrays: Arrays = {}
            start = time.perf_counter()
            for i, c in enumerate(cache):
                for part, held in (("keys", c.keys), ("values", c.values)):
                    if isinstance(held, tuple):  # quantized: packed data, scales, biases
                        for j, a in enumerate(held):
                            arrays[f"{i}.{part}.{j}"] = _host(a[..., : c.offset, :])
                    else:
                        arrays[f"{i}.{part}"] = _host(held[..., : c.offset, :])
                start, budget = yield from pause(start, budget)
            layout = {"kv_bits": str(cache[0].bits), "group_size": str(cache[0].group_size)} if isinstance(
                cache[0], QuantizedKV) else {}
            with contextlib.suppress(RuntimeError):  # closed: its model was unloaded
                self._io.submit(self._write, tokens, arrays, layout)
        finally:
            self._copies.pop(key, None)

    def finish_copies(self) -> None:
        """Run the copies under way to their end (engine thread, before its model is unloaded)."""
        for job in list(self._copies.values()):
            with contextlib.suppress(StopIteration):
                while True:
                    job.send(float("inf"))

    def _write(self, tokens: list[int], arrays: Arrays, layout: dict[str, str]) -> None:
        name = hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:32] + ".safetensors"
        try:
            for folder in (home(), self.root, self.folder):
                make_private_dir(folder)
            _write_safetensors(self.folder / name, arrays, {**layout, "tokens": json.dumps(tokens)})
        except OSError as e:
            self._writable = False
            warnings.warn(f"the prompt cache on disk stops writing ({self.folder}): {e}", RuntimeWarning, stacklevel=1)
            return
        with self._lock:
            self._index[name] = tuple(tokens)
        self._trim()

    def _trim(self) -> None:
        """Remove the least recently used files of the whole kv/ folder until it fits ``max_bytes``."""
        files = []
        for f in self.root.glob("*/*.safetensors"):
            with contextlib.suppress(OSError):
                st = f.stat()
                files.append((st.st_mtime, st.st_size, f))
        total = sum(size for _, size, _ in files)
        for _, size, f in sorted(files, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            self._forget(f)
            total -= size

    def _forget(self, f: Path) -> None:
        _remove(f)
        if f.parent == self.folder:
            with self._lock:
                self._index.pop(f.name, None)

    def read(self, name: str, done: Callable[[Future], None]) -> None:
        """Read file ``name`` in the background; ``done`` gets a future of (tokens, layout, arrays), or of
        None where the file is gone or corrupt (then removed)."""
        self._io.submit(self._read, name).add_done_callback(done)

    def _read(self, name: str) -> tuple[list[int], dict[str, str], Arrays] | None:
        f = self.folder / name
        try:
            found = _read_safetensors(f)
            os.utime(f)  # recently used: trimmed last
        except FileNotFoundError:
            found = None
        except (OSError, ValueError, KeyError, TypeError):
            found = None
            _remove(f)
        if found is None:
            with self._lock:
                self._index.pop(name, None)
            return None
        self.hits += 1
        return found

    def close(self) -> None:
        """Finish the writes under way."""
        self._io.shutdown(wait=True)


def open_tier(model_path: Path, max_bytes: int, kv_bits: int | None = None) -> DiskTier | None:
    """The disk tier of the model in ``model_path`` (its caches quantized to ``kv_bits``, if set); None when
    ``max_bytes`` is 0 or the home cannot hold it (a read-only home: one warning, the prompt cache stays in
    memory)."""
    if max_bytes <= 0:
        return None
    try:
        return DiskTier(model_path, max_bytes, kv_bits)
    except OSError as e:
        warnings.warn(f"the prompt cache stays in memory: {e}", RuntimeWarning, stacklevel=2)
        return None


def cache_layers(layout: dict[str, str], arrays: Arrays) -> Iterator[KVCache | QuantizedKV]:
    """The KV cache a file held, layer by layer, as evaluated MLX arrays (engine thread)."""
    if "kv_bits" in layout:
        for i in range(len(arrays) // 6):
            q = QuantizedKV(group_size=int(layout["group_size"]), bits=int(layout["kv_bits"]))
            keys, values = (tuple(_device(*arrays[f"{i}.{part}.{j}"]) for j in range(3)) for part in ("keys", "values"))
            q.state = (keys, values, keys[0].shape[2], q.group_size, q.bits)
            mx.eval(keys, values)
            yield q
        return
    for i in range(len(arrays) // 2):
        c = KVCache()
        k, v = (_device(*arrays[f"{i}.{part}"]) for part in ("keys", "values"))
        c.state = (k, v, k.shape[2])
        mx.eval(k, v)
        yield c


def _storable(c: Any) -> bool:
    """Whether a layer's cache can be written: a plain or a quantized KV cache holding floats."""
    if type(c) is KVCache:
        return c.keys is not None and c.keys.dtype in _DTYPES
    return type(c) is QuantizedKV and c.keys is not None and c.keys[1].dtype in _DTYPES


def _host(a: mx.array) -> tuple[str, np.ndarray]:
    """An MLX array in host memory with its safetensors dtype (bfloat16 travels as uint16)."""
    return _MX_NAMES[a.dtype], np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)


def _device(dtype: str, a: np.ndarray) -> mx.array:
    out = mx.array(a)
    return out.view(mx.bfloat16) if dtype == "BF16" else out


def common_prefix(a: tuple[int, ...], b: Sequence[int]) -> int:
    """The length of the common prefix of ``a`` and ``b``, by bisection on slices (compared in C)."""
    b_ = tuple(b[: len(a)])
    lo, hi = 0, len(b_)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b_[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def safetensors_header(tensors: Iterable[tuple[str, str, list[int], int]], metadata: dict[str, str]) -> bytes:
    """A safetensors file's start, its header's length and the header padded to 8 bytes, for ``tensors``
    (name, safetensors dtype, shape, bytes of each, in file order)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, dtype, shape, nbytes in tensors:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head


def _write_safetensors(path: Path, arrays: Arrays, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(safetensors_header(((k, d, list(a.shape), a.nbytes) for k, (d, a) in arrays.items()), metadata))
            for _, a in arrays.values():
                out.write(np.ascontiguousarray(a).tobytes())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _read_safetensors(path: Path) -> tuple[list[int], dict[str, str], Arrays]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    layout = header.pop("__metadata__")
    tokens = json.loads(layout.pop("tokens"))
    arrays: Arrays = {}
    for key, spec in header.items():
        dtype = spec["dtype"]
        start, end = spec["data_offsets"]
        if 8 + n + end > len(data):
            raise ValueError("truncated")
        np_dtype = _MX[dtype][1]
        a = np.frombuffer(data, np_dtype, (end - start) // np.dtype(np_dtype).itemsize, 8 + n + start)
        arrays[key] = dtype, a.reshape(spec["shape"])
    if not arrays or len(arrays) % (6 if "kv_bits" in layout else 2) or not tokens:
        raise ValueError("no KV cache")
    return tokens, layout, arrays


def _size(f: Path) -> int:
    try:
        return f.stat().st_size
    except OSError:
        return 0


def _remove(f: Path) -> None:
    with contextlib.suppress(OSError):
        f.unlink()
