"""Conversion to MLX on the engine thread, in slices, with progress in bytes written: what mlx-lm's own
convert writes, an interrupt leaving nothing, and the terminal's bar."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest

from mlx_manager_nb import store
from mlx_manager_nb.convert import convert


def weights(folder):
    found = {}
    for f in sorted(folder.glob("*.safetensors")):
        found.update(mx.load(str(f)))
    return found


def test_convert_writes_what_mlx_lm_writes_reporting_bytes_written(make_pool, tiny_model_path, tmp_path):
    from mlx_lm import convert as mlx_convert

    mlx_convert(str(tiny_model_path), str(tmp_path / "by-mlx-lm"), quantize=True, q_bits=4)
    pool = make_pool()
    seen = []
    path = convert(tiny_model_path, q_bits=4, name="tiny-q4", progress=lambda s, f: seen.append((s, f)), pool=pool)
    assert path == store.models_dir() / "tiny-q4"
    theirs, ours = weights(tmp_path / "by-mlx-lm"), weights(path)
    assert sorted(ours) == sorted(theirs) and all(mx.array_equal(ours[k], theirs[k]) for k in ours)
    assert all(ours[k].dtype == theirs[k].dtype for k in ours)
    config = json.loads((path / "config.json").read_text())
    assert config == json.loads((tmp_path / "by-mlx-lm" / "config.json").read_text())
    fractions = [f for stage, f in seen if stage == "converting"]
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == 1 and len(set(fractions)) > 10
    assert len(fractions) == len(ours) + 1  # one step per tensor written
    info = pool.load("tiny-q4")
    assert info.state == "ready"
    assert pool.chat([{"role": "user", "content": "Hi"}], model="tiny-q4", max_tokens=3).usage.completion_tokens > 0


def test_an_interrupted_conversion_leaves_nothing_and_the_engine_serves_on(make_pool, tiny_model_path):
    pool = make_pool()
    pool.load(str(tiny_model_path))

    def interrupt(stage, fraction):
        if fraction > 0.3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(tiny_model_path, q_bits=8, name="cut", progress=interrupt, pool=pool)
    assert os.listdir(store.models_dir()) == []  # neither the entry nor its temporary folder
    assert pool.chat([{"role": "user", "content": "Hi"}], max_tokens=3).usage.completion_tokens > 0
    assert convert(tiny_model_path, q_bits=8, name="cut", pool=pool).is_dir()


def test_convert_from_a_terminal_shows_a_bar(tiny_model_path, isolated_home):
    done = subprocess.run([sys.executable, "-m", "mlx_manager_nb", "convert", str(tiny_model_path), "--as", "t8",
                           "--q-bits", "8"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any("converting [" in line for line in lines) and "converting [....................] 0%" not in lines[-2]
    assert lines[-2].endswith("] 100%")
    assert lines[-1] == f"Converted {tiny_model_path} into {store.models_dir() / 't8'}."
    store.validate_model_dir(store.models_dir() / "t8")


def test_a_conversion_meeting_a_full_disk_leaves_nothing(tiny_model_path, isolated_home):
    import resource
    import signal

    def small_disk():  # a real limit: writing past 100 kB fails with EFBIG, as a full disk fails with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    run = subprocess.run([sys.executable, "-m", "mlx_manager_nb", "convert", str(tiny_model_path), "--as", "big"],
                         capture_output=True, text=True, timeout=120, preexec_fn=small_disk,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().endswith(f"error: Cannot convert {tiny_model_path}: the disk is full (File too large); "
                                       "nothing was written to the store.")
    assert os.listdir(store.models_dir()) == []


def test_a_loaded_model_answers_while_a_conversion_runs(make_pool, tiny_model_path, monkeypatch):
    from mlx_manager_nb import convert as conversion
    from mlx_manager_nb import slices

    monkeypatch.setattr(slices, "IDLE_SLICE", 0.0)  # a tensor per slice
    monkeypatch.setattr(conversion, "QUEUED_BYTES", 1)  # the job waits, alive, until the writer takes each tensor
    pool = make_pool()
    pool.load(str(tiny_model_path), alias="tiny")
    answered = []

    def chat_midway(stage, fraction):  # the writer holds the job back while the model answers
        if 0.3 < fraction < 1 and not answered:
            answered.append(pool.chat([{"role": "user", "content": "Hi"}], model="tiny", max_tokens=4))

    path = convert(tiny_model_path, q_bits=4, name="beside", progress=chat_midway, pool=pool)
    assert answered and answered[0].usage.completion_tokens > 0
    store.validate_model_dir(path)
