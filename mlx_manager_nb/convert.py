"""Convert a Hugging Face safetensors model to MLX in the store, with mlx-lm's own loading, casting and
quantization, and progress in bytes written.

The MLX work runs on the pool's engine thread as a sliced job (see :mod:`.slices`): the model is
read lazily, cast and quantized as ``mlx_lm.convert`` does, then each tensor is evaluated and copied
to host memory, as many per slice as the slice's time allows, so models being served keep answering.
The calling thread writes each tensor into its shard as it arrives (mlx-lm's sharding, a
``model.safetensors.index.json``, its config and tokenizer files) and reports the bytes written
against the output's size, known before any is written. An interrupt stops the job at its next
tensor and removes what was written.

>>> convert("HuggingFaceTB/SmolLM2-135M-Instruct", q_bits=4)
PosixPath('/home/me/.cache/mlx_manager_nb/models/smollm2-135m-instruct-4bit')
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from . import store
from .errors import EngineError, InvalidModelError, MLXManagerError
from .hub import DISK_FULL
from .kv_disk import safetensors_header
from .slices import Job, pause

if TYPE_CHECKING:
    from .model_pool import Pool

QUEUED_BYTES = 512 << 20  # host copies the engine may hand over before the writer has written them
_SAFETENSORS = {mx.bool_: "BOOL", mx.uint8: "U8", mx.uint16: "U16", mx.uint32: "U32", mx.uint64: "U64",
                mx.int8: "I8", mx.int16: "I16", mx.int32: "I32", mx.int64: "I64", mx.float16: "F16",
                mx.bfloat16: "BF16", mx.float32: "F32", mx.float64: "F64"}


def convert(ref: str | os.PathLike, q_bits: int | None = None, name: str | None = None,
            progress: store.Progress | None = None, pool: Pool | None = None) -> Path:
    """Convert a Hugging Face safetensors model (any reference :func:`.store.resolve` takes: a repo id is
    pulled first) quantized to ``q_bits`` (4 or 8) if given, into the store; return its folder. The MLX
    work runs on ``pool``'s engine thread (default: the default pool's); ``progress`` gets
    ("downloading", fraction) while a repo is pulled, then ("converting", bytes written / output bytes)."""
    if q_bits not in (None, 4, 8):
        raise InvalidModelError(f"q_bits must be 4 or 8, not {q_bits}")
    if pool is None:
        from .defaults import default_pool

        pool = default_pool()
    source = store.resolve(ref, progress)
    name = name or store.store_name(Path(str(ref).rstrip("/").split("/")[-1] + (f"-{q_bits}bit" if q_bits else "-mlx")))
    try:
        return store.install(name, lambda tmp: _write(pool, source, q_bits, tmp, progress))
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise MLXManagerError(f"Cannot convert {ref}: the disk is full ({e.strerror}); nothing was written to "
                              f"the store.") from None


def _write(pool: Pool, source: Path, q_bits: int | None, out: Path, progress: store.Progress | None) -> None:
    from mlx_lm.utils import load_tokenizer, save_config

    tokenizer = load_tokenizer(source, eos_token_ids=store.read_config(source).get("eos_token_id"))
    handover: queue.Queue = queue.Queue()
    queued = _Queued()
    cancelled = threading.Event()
    pool.engine.add_job(_convert_job(source, q_bits, handover, queued, cancelled))

    def receive() -> tuple:
        while True:
            try:
                item = handover.get(timeout=0.2)  # a short wait: an interrupt is seen at once
            except queue.Empty:
                if not pool.engine.alive:  # it died without a word: nothing more comes
                    raise EngineError("the engine stopped during the conversion") from None
                continue
            if item[0] == "error":
                raise item[1]
            return item

    try:
        _, shards, config, keep_vision, parameters = receive()
        total, written = sum(n for shard in shards for _, _, _, n in shard), 0
        if progress:
            progress("converting", 0.0)
        weight_map = {}
        for i, shard in enumerate(shards):
            file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with (out / file).open("wb") as f:
                f.write(_header(shard))
                for key, _, _, nbytes in shard:
                    _, got, data = receive()
                    assert got == key, (got, key)
                    f.write(np.ascontiguousarray(data).data)
                    queued.add(-nbytes)
                    written += nbytes
                    weight_map[key] = file
                    if progress:
                        progress("converting", written / total if total else 1.0)
    except BaseException:
        cancelled.set()
        raise
    index = {"metadata": {"total_size": total, "total_parameters": parameters},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    save_config(config, out / "config.json", keep_vision_config=keep_vision)
    tokenizer.save_pretrained(str(out))
    for extra in [*source.glob("*.py"), source / "generation_config.json"]:
        if extra.is_file():
            shutil.copy(extra, out)


def _header(shard: list[tuple[str, Any, list[int], int]]) -> bytes:
    """A safetensors header for ``shard`` (name, dtype, shape, bytes per tensor, in file order)."""
    return safetensors_header(((key, _SAFETENSORS[dtype], shape, n) for key, dtype, shape, n in shard),
                              {"format": "mlx"})


class _Queued:
    """Bytes handed to the writer and not written yet (engine thread and writer)."""

    def __init__(self) -> None:
        self.bytes = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n


def _convert_job(source: Path, q_bits: int | None, handover: queue.Queue, queued: _Queued,
                 cancelled: threading.Event) -> Job:
    """Load ``source`` lazily, cast and quantize it as mlx-lm's convert does, then evaluate its tensors shard
    by shard, as many per slice as the slice's time allows, handing host copies to the writer (an engine job)."""
    from mlx.utils import tree_flatten, tree_map_with_path
    from mlx_lm.convert import MODEL_CONVERSION_DTYPES
    from mlx_lm.utils import get_total_parameters, load_model, make_shards, quantize_model

    try:
        budget = yield
        start = time.perf_counter()
        model, config = load_model(source, lazy=True)
        dtype = config.get("torch_dtype") or (config.get("text_config") or {}).get("dtype")
        if dtype in MODEL_CONVERSION_DTYPES:
            cast = getattr(model, "cast_predicate", lambda _: True)
            to = getattr(mx, dtype)
            model.update(tree_map_with_path(
                lambda k, v: v.astype(to) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v,
                model.parameters()))
        if q_bits:
            with contextlib.redirect_stdout(io.StringIO()):  # its "[INFO] Quantized model with ..." line
                model, config = quantize_model(model, config, None, q_bits)
        shards = make_shards(dict(tree_flatten(model.parameters())))
        handover.put(("plan", [[(k, v.dtype, list(v.shape), v.nbytes) for k, v in s.items()] for s in shards],
                      config, "vision_tower" in getattr(model, "model", {}), get_total_parameters(model)))
        del model  # the shards hold the only references: each tensor is freed once handed over
        for shard in shards:
            for key in list(shard):
                while queued.bytes and queued.bytes + shard[key].nbytes > QUEUED_BYTES and not cancelled.is_set():
                    time.sleep(0.005)  # the writer lags: let it catch up, a slice at a time
                    budget = yield
                    start = time.perf_counter()
                if cancelled.is_set():
                    return
                a = shard.pop(key)
                mx.eval(a)
                queued.add(a.nbytes)
                handover.put(("tensor", key, np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)))
                del a
                start, budget = yield from pause(start, budget)
    except GeneratorExit:
        handover.put(("error", EngineError("the engine stopped during the conversion")))
        raise
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        handover.put(("error", InvalidModelError(f"cannot convert {source}: {e}")))
    except BaseException as e:
        handover.put(("error", e))
