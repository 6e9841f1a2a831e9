"""OpenBLAS's thread count: the library's default, the user's overrides, and doctor() showing it."""

import json
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


FIT = """
import json, sys, threading
import mlx_manager_nb
from mlx_manager_nb import blas, doctor
from mlx_manager_nb.model_pool import Pool
blas._others_busy = lambda: float(sys.argv[2])  # the CPU time other processes take: none, or every core's
pool = Pool(keep_alive=None)
pool.load(sys.argv[1], alias="tiny")
blas.chosen.clear()  # loading ran in slices: wide work
pool.complete("The quick brown fox", max_tokens=4, temperature=0)
alone = dict(blas.chosen)
long = " ".join(f"word{i}" for i in range(200))  # prefilled in slices
calls = [threading.Thread(target=pool.complete, args=(p,), kwargs={"max_tokens": 24, "temperature": 0})
         for p in (long, "Once upon a time", "A second prompt", "And a third one")]
for c in calls:
    c.start()
for c in calls:
    c.join()
pool.complete("The quick brown fox", max_tokens=4, temperature=0)
print(json.dumps({"alone": alone, "after": doctor(pool)["blas_threads_by_work"], "now": blas.threads()}))
pool.close()
"""


@pytest.mark.skipif(not blas.status.startswith("openblas"), reason="OpenBLAS is not bound here")
@pytest.mark.parametrize("others", [0.0, 64.0])
def test_engine_sets_threads_from_the_work_and_the_cpu(tiny_model_path, others):
    """One decoding row runs on the default thread count; prefill and batches on every core other
    processes leave free (all of them on an idle CPU, one on a busy one); doctor() shows the choices."""
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "MLX_NB_BLAS_THREADS")}
    out = subprocess.run([sys.executable, "-c", FIT, str(tiny_model_path), str(others)], env=base,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    cores = len(os.sched_getaffinity(0))
    assert seen["alone"] == {"one row": blas.DEFAULT_THREADS}
    assert seen["after"] == {"one row": blas.DEFAULT_THREADS, "wide": 1 if others else cores}
    assert seen["now"] == blas.DEFAULT_THREADS  # the last step decoded one row


def test_a_fixed_thread_count_is_left_alone(tiny_model_path):
    env = {**{k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}, "MLX_NB_BLAS_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", FIT, str(tiny_model_path), "0"], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["alone"] == seen["after"] == {} and seen["now"] == (2 if blas.status.startswith("openblas") else None)


def test_other_processes_cpu_time_is_measured(monkeypatch):
    """Two spinning processes show as (nearly) a core or more of others' CPU time, this one's own spinning not."""
    import time

    monkeypatch.setattr(blas, "_contention", {"at": 0.0, "busy": 0.0, "ours": 0.0, "others": 0.0})
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        blas._others_busy()
        end = time.monotonic() + blas.CONTENTION_SECONDS + 0.1
        while time.monotonic() < end:  # this process spins too: its own time is not the others'
            pass
        others = blas._others_busy()
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert 0.8 <= others < len(os.sched_getaffinity(0)) - 0.1  # all cores busy, but not all by others
    assert blas._others_busy() == others  # measured at most once per CONTENTION_SECONDS
