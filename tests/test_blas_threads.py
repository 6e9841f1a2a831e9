"""OpenBLAS's thread count: the library's default, the user's overrides, and doctor() showing it."""

import os
import subprocess
import sys

import pytest

from mlx_manager_nb import blas

REPORT = "import mlx_manager_nb; from mlx_manager_nb import blas; print(blas.threads(), blas.threads_source)"


@pytest.mark.skipif(not blas.status.startswith("openblas"), reason="OpenBLAS is not bound here")
@pytest.mark.parametrize(
    "env, threads, source",
    [
        ({}, blas.DEFAULT_THREADS, "default"),
        ({"OPENBLAS_NUM_THREADS": "2"}, 2, "OPENBLAS_NUM_THREADS"),
        ({"OPENBLAS_NUM_THREADS": "2", "MLX_NB_BLAS_THREADS": "1"}, 1, "MLX_NB_BLAS_THREADS"),
    ],
)
def test_thread_count_defaults_and_yields_to_the_user(env, threads, source):
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "MLX_NB_BLAS_THREADS")}
    out = subprocess.run([sys.executable, "-c", REPORT], env={**base, **env}, capture_output=True, text=True,
                         check=True).stdout.split(maxsplit=1)
    assert int(out[0]) == threads and out[1].startswith(source)


def test_doctor_shows_the_thread_setting(make_pool):
    from mlx_manager_nb import doctor

    shown = doctor(make_pool(keep_alive=None))["blas_threads"]
    assert shown == (f"{blas.threads()} ({blas.threads_source})" if blas.threads() else "n/a")
