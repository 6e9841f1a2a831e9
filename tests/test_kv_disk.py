"""The prompt cache's disk tier on the tiny model: a new pool on the same home reuses a long prefix's KV."""

import json
import os
import shutil
import stat

import pytest
from helpers import wait_for

from mlx_manager_nb import kv_disk

LONG = [{"role": "user", "content": " ".join(f"item {i} is blue." for i in range(80))}]  # over 1,024 tokens


@pytest.fixture
def model(wide_tiny_model_path, tmp_path):
    """A copy of the tiny model (4,096 tokens of context) this test may change."""
    return shutil.copytree(wide_tiny_model_path, tmp_path / "tiny-copy")


def answer(make_pool, model, messages=LONG, **kwargs):
    """Load ``model`` in a new pool, answer ``messages`` greedily, close the pool; the result and the model's info."""
    pool = make_pool(keep_alive=None, **kwargs)
    pool.load(model, alias="tiny")
    result = pool.chat(messages, temperature=0, max_tokens=8)
    (info,) = pool.models()
    pool.close()
    return result, info


def files(home):
    return sorted((home / "kv").glob("*/*.safetensors"))


def test_a_new_pool_on_the_same_home_reuses_a_long_prefix_from_disk(make_pool, model, isolated_home):
    first, _ = answer(make_pool, model)
    assert first.usage.prompt_tokens >= kv_disk.MIN_TOKENS and first.usage.cached_tokens == 0
    (saved,) = files(isolated_home)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert {stat.S_IMODE(d.stat().st_mode) for d in (saved.parent, saved.parent.parent, isolated_home)} == {0o700}
    second, info = answer(make_pool, model)
    assert second.usage.cached_tokens >= first.usage.prompt_tokens - 1
    assert second.text == first.text
    assert info.disk_hits == 1 and info.disk_cache_bytes == saved.stat().st_size


def test_a_truncated_or_corrupt_file_is_a_miss_and_is_removed(make_pool, model, isolated_home):
    first, _ = answer(make_pool, model)
    (saved,) = files(isolated_home)
    size = saved.stat().st_size
    saved.write_bytes(saved.read_bytes()[: size // 2])
    junk = saved.with_name("junk.safetensors")
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    second, info = answer(make_pool, model)
    assert second.usage.cached_tokens == 0 and second.text == first.text
    assert files(isolated_home) == [saved] and saved.stat().st_size == size  # removed, then written whole again
    assert info.disk_hits == 0


def test_the_folder_stays_within_its_byte_budget(make_pool, model, isolated_home):
    answer(make_pool, model)
    one = files(isolated_home)[0].stat().st_size
    questions = [[{"role": "user", "content": f"{n}: " + LONG[0]["content"][::-1]}] for n in range(3)]
    pool = make_pool(keep_alive=None, kv_disk_bytes=int(one * 1.5))
    pool.load(model, alias="tiny")
    for q in questions:
        pool.chat(q, temperature=0, max_tokens=8)
    pool.close()
    assert len(files(isolated_home)) == 1 and sum(f.stat().st_size for f in files(isolated_home)) <= one * 1.5
    last, _ = answer(make_pool, model, questions[-1])  # the newest stayed
    assert last.usage.cached_tokens > 0


def test_a_model_changed_under_the_same_name_does_not_reuse_the_cache(make_pool, model, isolated_home):
    answer(make_pool, model)
    config = model / "config.json"
    config.write_text(config.read_text())
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    second, info = answer(make_pool, model)
    assert second.usage.cached_tokens == 0 and info.disk_hits == 0
    assert len({f.parent for f in files(isolated_home)}) == 2  # one folder per identity


def test_kv_disk_bytes_0_writes_nothing(make_pool, model, isolated_home):
    answer(make_pool, model, kv_disk_bytes=0)
    second, info = answer(make_pool, model, kv_disk_bytes=0)
    assert not (isolated_home / "kv").exists()
    assert second.usage.cached_tokens == 0 and info.disk_cache_bytes == 0


def test_a_cache_folder_that_cannot_be_written_stops_the_writes_with_one_warning(make_pool, model, isolated_home):
    blocked = isolated_home / "kv" / kv_disk.fingerprint(model)
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a folder")  # as a full disk or a read-only home, even for root
    pool = make_pool(keep_alive=None)
    pool.load(model, alias="tiny")
    with pytest.warns(RuntimeWarning, match="stops writing") as warned:
        first = pool.chat(LONG, temperature=0, max_tokens=8)
        again = pool.chat([{"role": "user", "content": LONG[0]["content"][::-1]}], temperature=0, max_tokens=8)
        pool.close()
    assert first.finish_reason and again.finish_reason and len(warned) == 1
    assert files(isolated_home) == []


def test_a_warmed_prefix_is_kept_on_disk_whatever_its_length(make_pool, model, isolated_home):
    doc = [{"role": "system", "content": "The secret colour is blue. " * 20}]
    pool = make_pool(keep_alive=None)
    pool.load(model, alias="tiny")
    warmed = pool.warm("tiny", doc)
    pool.close()
    assert 64 < warmed.usage.prompt_tokens < kv_disk.MIN_TOKENS and len(files(isolated_home)) == 1
    question, info = answer(make_pool, model, [*doc, {"role": "user", "content": "What is the secret colour?"}])
    assert question.usage.cached_tokens > 64 and info.disk_hits == 1


def test_a_cache_folder_deleted_while_serving_is_a_miss_then_written_again(make_pool, model, isolated_home):
    first, _ = answer(make_pool, model)
    pool = make_pool(keep_alive=None)
    pool.load(model, alias="tiny")
    shutil.rmtree(isolated_home / "kv")
    again = pool.chat(LONG, temperature=0, max_tokens=8)
    pool.close()
    assert again.usage.cached_tokens == 0 and again.text == first.text
    assert len(files(isolated_home)) == 1


def test_a_restarted_kernel_answers_a_long_prompt_from_the_disk_cache(tmp_path, wide_tiny_model_path):
    from test_magics_kernel import execute, printed, start_kernel

    ask = ("import json, mlx_manager_nb\n"
           f"r = mlx_manager_nb.pool.chat({LONG!r}, temperature=0, max_tokens=8)\n"
           "print(json.dumps([r.usage.prompt_tokens, r.usage.cached_tokens, r.text]))")
    km, kc, _ = start_kernel(tmp_path, wide_tiny_model_path)
    try:
        tokens, cached, text = json.loads(printed(kc, ask))
        km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=60)
        reply, _ = execute(kc, f"%load_ext mlx_manager_nb\n%mlx load {wide_tiny_model_path} --as tiny")
        assert reply["content"]["status"] == "ok"
        assert json.loads(printed(kc, ask)) == [tokens, tokens - 1, text] and cached == 0
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_two_pools_sharing_a_home_read_each_others_files(make_pool, model, isolated_home):
    a, b = make_pool(keep_alive=None), make_pool(keep_alive=None)  # as two kernels: each its own engine
    for pool in (a, b):
        pool.load(model, alias="tiny")
    first = a.chat(LONG, temperature=0, max_tokens=8)
    assert wait_for(lambda: len(files(isolated_home)) == 1)
    second = b.chat(LONG, temperature=0, max_tokens=8)
    assert second.usage.cached_tokens >= first.usage.prompt_tokens - 1 and second.text == first.text


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_a_kv_cache_comes_back_from_disk_as_it_was_written(tmp_path, dtype):
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from mlx_manager_nb.engine import Engine

    cache = []
    for layer in range(2):
        c = KVCache()
        c.update_and_fetch(*(mx.random.normal((1, 2, 5, 4)).astype(getattr(mx, dtype)) + layer for _ in "kv"))
        cache.append(c)
    (tmp_path / "m").mkdir()
    tier = kv_disk.DiskTier(tmp_path / "m")
    next(tier.save(list(range(5)), cache, keep=True))  # the engine starts its jobs
    tier.finish_copies()  # as an unload does
    tier.close()
    name, common = kv_disk.DiskTier(tmp_path / "m").find([0, 1, 2, 3, 9])
    tokens, stored, arrays = kv_disk._read_safetensors(tier.folder / name)
    engine = Engine()  # MLX arrays are made on the engine thread
    back = engine.run(lambda: list(kv_disk.cache_layers(stored, arrays))).result()
    engine.stop()
    assert common == 4 and tokens == list(range(5))
    for a, b in zip(cache, back, strict=True):
        assert b.offset == 5 and b.keys.dtype == getattr(mx, dtype)
        assert mx.array_equal(a.state[0][..., :5, :], b.keys) and mx.array_equal(a.state[1][..., :5, :], b.values)


def test_du_counts_the_prompt_cache_on_disk(make_pool, model, isolated_home, shell):
    from IPython.utils.capture import capture_output

    from mlx_manager_nb import display

    answer(make_pool, model)
    (saved,) = files(isolated_home)
    with capture_output() as c:
        shell.run_line_magic("mlx", "du")
    row = next(line for line in c.outputs[0].data["text/plain"].splitlines() if "prompt cache" in line)
    assert display.size(saved.stat().st_size) in row


def test_models_ps_and_the_pool_panel_show_cache_bytes_and_hit_rates(make_pool, model, isolated_home, shell):
    from IPython.utils.capture import capture_output

    from mlx_manager_nb import defaults
    from mlx_manager_nb.widgets import pool_panel

    answer(make_pool, model)  # a miss, written to disk
    pool = defaults.default_pool()  # the one %mlx ps shows
    pool.load(model, alias="tiny")
    pool.chat(LONG, temperature=0, max_tokens=8)  # from disk
    pool.chat(LONG, temperature=0, max_tokens=8)  # from memory
    pool.chat([{"role": "user", "content": "Hi"}], temperature=0, max_tokens=2)  # shares the template's start
    pool.complete("Once upon a time", temperature=0, max_tokens=2)  # a miss: no template, another first token
    (info,) = pool.models()
    assert (info.prompt_lookups, info.memory_hits, info.disk_hits) == (4, 2, 1) and info.hit_rate == 0.75
    assert info.cache_bytes > 0 and info.disk_cache_bytes > 0
    parts = pool_panel(pool).parts
    assert "75% of 4 (2 memory, 1 disk)" in parts.table.value
    assert "in memory" in parts.memory_text.value and "on disk" in parts.memory_text.value
    with capture_output() as c:
        shell.run_line_magic("mlx", "ps")
    assert "hit rate" in c.outputs[0].data["text/plain"] and "75% of 4" in c.outputs[0].data["text/plain"]


def test_a_long_entry_leaving_the_memory_tier_is_on_disk(make_pool, model, isolated_home):
    """Long entries are written as they enter the memory tier; one whose file went missing meanwhile is
    written again as it leaves it (evicted by newer entries)."""
    from mlx_manager_nb.engine import PROMPT_CACHE_ENTRIES

    pool = make_pool(keep_alive=None)
    pool.load(model, alias="tiny")
    first = pool.chat(LONG, temperature=0, max_tokens=8)
    assert wait_for(lambda: len(files(isolated_home)) == 1)
    (saved,) = files(isolated_home)
    saved.unlink()
    for n in range(PROMPT_CACHE_ENTRIES):
        pool.chat([{"role": "user", "content": f"Question {n}?"}], temperature=0, max_tokens=1)
    assert wait_for(lambda: files(isolated_home) == [saved])
    pool.close()
    second, info = answer(make_pool, model)
    assert info.disk_hits == 1 and second.usage.cached_tokens >= first.usage.prompt_tokens - 1


def test_a_model_replaced_in_the_store_under_the_same_name_does_not_reuse_the_cache(make_pool, model, isolated_home,
                                                                                     tmp_path):
    import json as json_

    from tiny_model import build_tiny_model

    from mlx_manager_nb import store

    stored = store.models_dir() / "tiny"
    shutil.copytree(model, stored)
    answer(make_pool, "tiny")
    other = build_tiny_model(tmp_path / "other", seed=1)  # other weights, same names and sizes
    config = json_.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json_.dumps({**config, "max_position_embeddings": 4096}))
    shutil.rmtree(stored)
    shutil.copytree(other, stored)
    replaced, info = answer(make_pool, "tiny")
    fresh, _ = answer(make_pool, other, kv_disk_bytes=0)
    assert replaced.usage.cached_tokens == 0 and info.disk_hits == 0 and replaced.text == fresh.text
    assert len({f.parent for f in files(isolated_home)}) == 2
