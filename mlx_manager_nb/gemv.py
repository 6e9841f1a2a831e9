"""One-row matrix products through ``sgemv``: a ``cblas_sgemm`` for MLX that forwards them.

MLX's CPU backend computes every float32 product with ``cblas_sgemm``, also the one-row products of a
decoding step (one token's activations times each weight matrix: 211 of them per token for the demo
model). OpenBLAS runs those through its general kernel, which reads weights of 576 columns at 6-8 GB/s
on one core of this machine, where its ``sgemv`` reads the same at 11-12 GB/s (the 1536 x 576 MLP
weights and the 49,152 x 576 output projection; the 576 x 1536 one is even, ~15 GB/s). So a tiny C
library, compiled here with the system's C compiler and loaded before OpenBLAS, defines
``cblas_sgemm``: a product with one row goes to OpenBLAS's ``cblas_sgemv``; one of 2 to 6 rows against
a weight as ``nn.Linear`` stores it (a speculative step's drafted tokens, a small batch) to a kernel
of its own that reads each weight row once for all of them (OpenBLAS's ``sgemm`` reads such products
at 4-5 GB/s on one core here, this kernel at 12-21 GB/s for 2 to 6 rows: the 49,152 x 576 output
projection 21 GB/s at 2 rows, 17 at 5; at 7 and 8 OpenBLAS's two threads read faster); every other
product to OpenBLAS's ``cblas_sgemm``. MLX binds to it when it loads. Where there is no compiler, or
``MLX_NB_GEMV=0``, MLX calls OpenBLAS directly as before.

They compute the same dot products in another order, so results can differ in the last bits (raw
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
#include <stddef.h>
#include <string.h>
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

/* c (M x n) = a (M x k) b^T for b (n x k): each row of b read once, dotted with the M rows of a (in L1) */
typedef float v8 __attribute__((vector_size(32)));
#define ROWS(M) \
static void rows_##M(int n, int k, const float *a, int lda, const float *b, int ldb, float *c, int ldc) { \
    for (int j = 0; j < n; j++) { \
        const float *w = b + (size_t)j * ldb; \
        v8 acc[M]; \
        _Pragma("GCC unroll 8") for (int i = 0; i < M; i++) acc[i] = (v8){0}; \
        int p = 0; \
        for (; p + 8 <= k; p += 8) { \
            v8 wv; \
            memcpy(&wv, w + p, sizeof wv); \
            _Pragma("GCC unroll 8") for (int i = 0; i < M; i++) { \
                v8 xv; \
                memcpy(&xv, a + (size_t)i * lda + p, sizeof xv); \
                acc[i] += xv * wv; \
            } \
        } \
        for (int i = 0; i < M; i++) { \
            float s = 0; \
            for (int q = 0; q < 8; q++) s += acc[i][q]; \
            for (int r = p; r < k; r++) s += a[(size_t)i * lda + r] * w[r]; \
            c[(size_t)i * ldc + j] = s; \
        } \
    } \
}
ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6)
typedef void (*rows_fn)(int, int, const float *, int, const float *, int, float *, int);
static const rows_fn by_rows[] = {0, 0, rows_2, rows_3, rows_4, rows_5, rows_6};  /* by row count */
enum { SMALL_ROWS = sizeof by_rows / sizeof by_rows[0] - 1 };

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
    if (order == ROW_MAJOR && m >= 2 && m <= SMALL_ROWS && ta == NO_TRANS && tb == TRANS && alpha == 1.0f
            && beta == 0.0f) {
        by_rows[m](n, k, a, lda, b, ldb, c, ldc);
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
    error: Exception | None = None
    for flags in (["-O3", "-march=native"], ["-O3"]):  # the machine's vector width where the compiler knows it
        try:
            subprocess.run([compiler, *flags, "-shared", "-fPIC", source, "-o", lib, "-ldl"], check=True,
                           capture_output=True, timeout=60)
            return ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
        except (OSError, subprocess.SubprocessError) as e:
            error = e
    return f"off (compiling failed: {type(error).__name__})"


def connect(shim: ctypes.CDLL, blas: ctypes.CDLL) -> None:
    """Point the library at OpenBLAS's own ``cblas_sgemm`` and ``cblas_sgemv``."""
    shim.mlx_nb_gemv_init(ctypes.cast(blas.cblas_sgemm, ctypes.c_void_p),
                          ctypes.cast(blas.cblas_sgemv, ctypes.c_void_p))
