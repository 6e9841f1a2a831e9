"""One-row matrix products through ``sgemv``: a ``cblas_sgemm`` for MLX that forwards them.

MLX's CPU backend computes every float32 product with ``cblas_sgemm``, also the one-row products of a
decoding step (one token's activations times each weight matrix: 211 of them per token for the demo
model). OpenBLAS runs those through its general kernel, which reads weights of 576 columns at 6-8 GB/s
on one core of this machine, where its ``sgemv`` reads the same at 11-12 GB/s (the 1536 x 576 MLP
weights and the 49,152 x 576 output projection; the 576 x 1536 one is even, ~15 GB/s). So a tiny C
library, compiled here with the system's C compiler and loaded before OpenBLAS, defines
``cblas_sgemm``: a product with one row goes to OpenBLAS's ``cblas_sgemv``, every other to its
``cblas_sgemm``. MLX binds to it when it loads. Where there is no compiler, or ``MLX_NB_GEMV=0``,
MLX calls OpenBLAS directly as before.

The two compute the same dot products in another order, so results can differ in the last bits (raw
mlx-lm run in the same process uses the same path, so its output and the pool's stay identical).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float, float *, int);
static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;

void mlx_nb_gemv_init(void *sgemm, void *sgemv) { real_sgemm = (sgemm_fn)sgemm; real_sgemv = (sgemv_fn)sgemv; }

static void resolve(void) { /* not connected (OpenBLAS failed to load): the next library's BLAS */
    real_sgemv = (sgemv_fn)dlsym(RTLD_NEXT, "cblas_sgemv");
    real_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
}

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc) {
    if (!real_sgemm)
        resolve();
    if (order == ROW_MAJOR && m == 1 && ta == NO_TRANS && real_sgemv) {
        /* c (1 x n) = a (1 x k) op(b): y = B x for b (n x k) transposed, y = B^T x for b (k x n) */
        if (tb == TRANS)
            real_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, 1, beta, c, 1);
        else
            real_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, 1, beta, c, 1);
        return;
    }
    real_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""
#: The shared library's file name (in a private temporary folder, deleted once loaded).
NAME = "libmlx_nb_gemv.so"


def build(folder: str) -> ctypes.CDLL | str:
    """Compile the library into ``folder`` and load it globally (before OpenBLAS: its ``cblas_sgemm`` must
    be the one MLX finds); returns it, or why not."""
    if os.environ.get("MLX_NB_GEMV") == "0":
        return "off (MLX_NB_GEMV=0)"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return "off (no C compiler)"
    source, lib = os.path.join(folder, "gemv.c"), os.path.join(folder, NAME)
    with open(source, "w") as f:
        f.write(SOURCE)
    try:
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", source, "-o", lib, "-ldl"], check=True,
                       capture_output=True, timeout=60)
        return ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
    except (OSError, subprocess.SubprocessError) as e:
        return f"off (compiling failed: {type(e).__name__})"


def connect(shim: ctypes.CDLL, blas: ctypes.CDLL) -> None:
    """Point the library at OpenBLAS's own ``cblas_sgemm`` and ``cblas_sgemv``."""
    shim.mlx_nb_gemv_init(ctypes.cast(blas.cblas_sgemm, ctypes.c_void_p),
                          ctypes.cast(blas.cblas_sgemv, ctypes.c_void_p))
