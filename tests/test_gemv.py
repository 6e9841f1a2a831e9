"""One-row products through sgemv and products of a few rows through the shim's own kernel: the same
results as numpy, and the same greedy text as through sgemm."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_manager_nb import blas

on = pytest.mark.skipif(blas.gemv_status != "sgemv", reason=f"one-row products are not forwarded: {blas.gemv_status}")


@on
@pytest.mark.parametrize("n, k", [(7, 5), (1536, 576), (576, 1536), (300, 1)])
def test_one_row_products_equal_numpy_in_every_layout(n, k):
    """A weight as stored (transposed in the product, as nn.Linear uses it), as a contiguous transposed
    copy, a strided slice of a wider one; with addmm's alpha and beta; batched rows of one; 2 to 6 rows (the
    shim's kernel), also of a strided slice; 7 rows (sgemm)."""
    key = mx.random.key(n + k)
    w = mx.random.normal((n, k), key=key)
    wide = mx.random.normal((n, 2 * k + 3), key=mx.random.split(key)[0])
    x, x2 = mx.random.normal((1, k), key=mx.random.split(key)[1]), mx.random.normal((2, k), key=key)
    c = mx.random.normal((1, n), key=mx.random.split(key)[1])
    wn, widen, xn, x2n, cn = (np.array(a) for a in (w, wide, x, x2, c))
    batched = mx.random.normal((3, 1, k), key=key)
    cases = [
        (x @ w.T, xn @ wn.T),
        (x @ mx.contiguous(w.T), xn @ wn.T),
        (x @ wide[:, 3:k + 3].T, xn @ widen[:, 3:k + 3].T),
        (mx.addmm(c, x, w.T, alpha=0.5, beta=2.0), 0.5 * (xn @ wn.T) + 2.0 * cn),
        (batched @ w.T, np.array(batched) @ wn.T),
        (x2 @ w.T, x2n @ wn.T),
        *((xs @ w.T, np.array(xs) @ wn.T) for xs in (mx.random.normal((rows, k), key=key) for rows in (3, 5, 6, 7))),
        (mx.random.normal((5, k), key=key) @ wide[:, 3:k + 3].T,
         np.array(mx.random.normal((5, k), key=key)) @ widen[:, 3:k + 3].T),
    ]
    for got, want in cases:
        assert np.allclose(np.array(got), want, rtol=1e-4, atol=1e-4 * np.sqrt(k))


GREEDY = """
import json, sys
import mlx_manager_nb
from mlx_manager_nb import blas
from mlx_manager_nb.model_pool import Pool
from mlx_lm import load, stream_generate
prompts = ["The capital of France is", "def add(a, b):", "Once upon a time there was a"]
pool = Pool(keep_alive=None)
pool.load(sys.argv[1], alias="tiny")
texts = [pool.complete(p, max_tokens=24, temperature=0).text for p in prompts]
pool.close()
model, tokenizer = load(sys.argv[1])
raw = [[r.token for r in stream_generate(model, tokenizer, p, max_tokens=24)] for p in prompts]
print(json.dumps({"status": blas.gemv_status, "library": blas.bound_library(), "texts": texts, "raw": raw}))
"""


@on
def test_greedy_output_is_the_same_through_sgemv_and_sgemm(tiny_model_path):
    """The pool and raw mlx-lm, each with one-row products through sgemv and (MLX_NB_GEMV=0) sgemm."""
    runs = {}
    for switch in ("1", "0"):
        done = subprocess.run([sys.executable, "-c", GREEDY, str(tiny_model_path)], capture_output=True, text=True,
                              env={**os.environ, "MLX_NB_GEMV": switch}, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[switch] = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["1"]["status"] == "sgemv" and runs["0"]["status"] == "off (MLX_NB_GEMV=0)"
    assert "openblas" in runs["1"]["library"] and "openblas" in runs["0"]["library"]
    assert runs["1"]["texts"] == runs["0"]["texts"] and all(runs["1"]["texts"])
    assert runs["1"]["raw"] == runs["0"]["raw"]
