"""The CPU fast path: OpenBLAS bound before mlx, float32 weights for quantized models, doctor()."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from gguf_writer import write_tiny_gguf

from mlx_manager_nb import blas
from mlx_manager_nb.model_pool import Pool

linux_x86 = pytest.mark.skipif(
    sys.platform != "linux" or __import__("platform").machine() != "x86_64", reason="OpenBLAS wheel: Linux x86-64"
)


def python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


CHECK = """
import json, sys
{first}
import mlx.core as mx, numpy as np
from mlx_manager_nb import blas
a = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((200, 100)).astype(np.float32)
err = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max())
print(json.dumps({{"status": blas.status, "library": blas.bound_library(), "err": err}}))
"""


@linux_x86
def test_importing_the_library_first_binds_openblas_and_results_are_unchanged():
    done = python(CHECK.format(first="import mlx_manager_nb"))
    report = json.loads(done.stdout)
    assert report["status"].startswith("openblas: ") and "openblas" in report["library"]
    assert report["err"] < 1e-3
    assert "Warning" not in done.stderr


@linux_x86
def test_mlx_imported_first_keeps_the_reference_blas_and_says_so():
    done = python(CHECK.format(first="import mlx.core\nimport mlx_manager_nb"))
    report = json.loads(done.stdout)
    assert report["status"].startswith("reference BLAS: mlx was imported before mlx_manager_nb")
    assert "openblas" not in (report["library"] or "")
    assert "Import mlx_manager_nb first" in done.stderr
    assert report["err"] < 1e-3


@linux_x86
def test_the_fast_path_can_be_switched_off():
    report = json.loads(python(CHECK.format(first="import mlx_manager_nb"), MLX_NB_BLAS="reference").stdout)
    assert report["status"] == "reference BLAS (MLX_NB_BLAS=reference)"
    assert "openblas" not in (report["library"] or "")


@pytest.fixture
def quantized_model(tiny_model_path, tmp_path):
    """The tiny model as an 8-bit GGUF, imported: an mlx-lm folder with quantized layers."""
    path = tmp_path / "tiny-q8.gguf"
    write_tiny_gguf(tiny_model_path, path, "Q8_0")
    return path


def _logits(pool: Pool, tokens: list[int]) -> np.ndarray:
    (info,) = pool.models()
    model = pool.engine.runner(info.name).model
    return pool.engine.run(lambda: np.array(model(mx.array([tokens]))[0, -1].astype(mx.float32))).result()


def test_dequantized_weights_give_the_same_outputs(make_pool, quantized_model):
    float_pool, quant_pool = make_pool(dequantize=True, keep_alive=None), make_pool(dequantize=False, keep_alive=None)
    float_pool.load(quantized_model)
    quant_pool.load(quantized_model)
    float_model = float_pool.engine.runner(float_pool.models()[0].name).model
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in float_model.named_modules())
    assert {p.dtype for _, p in __import__("mlx.utils").utils.tree_flatten(float_model.parameters())} == {mx.float32}
    assert float_pool.models()[0].size_bytes > 3 * quant_pool.models()[0].size_bytes
    a, b = _logits(float_pool, [1, 2, 3, 4, 5]), _logits(quant_pool, [1, 2, 3, 4, 5])
    assert np.abs(a - b).max() <= 0.02 * np.abs(b).max()
    hi = [{"role": "user", "content": "Hello"}]
    greedy = [p.chat(hi, temperature=0, max_tokens=8).text for p in (float_pool, quant_pool)]
    assert greedy[0] == greedy[1]


def test_auto_dequantizes_on_cpu_only_when_the_float_weights_fit(make_pool, quantized_model):
    roomy = make_pool(keep_alive=None)
    assert roomy.load(quantized_model).size_bytes > 3 * quantized_model.stat().st_size // 2
    tight = make_pool(keep_alive=None, max_memory=quantized_model.stat().st_size * 2)
    size = tight.load(quantized_model).size_bytes
    assert size < quantized_model.stat().st_size * 2


def test_doctor_reports_the_blas_and_a_measured_speed(make_pool, tiny_model_path):
    from mlx_manager_nb import doctor

    pool = make_pool(keep_alive=None)
    report = doctor(pool)
    assert report["blas"] == blas.status
    assert report["gflops"] > 0
    assert report["device"] in ("CPU", "GPU (Metal)")
    assert report["max_memory"] == pool.max_memory and report["dequantize"].startswith("auto")
