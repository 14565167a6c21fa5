"""`ffcl_jax.compilation_cache`: a second process loads the steps the first one compiled."""

from __future__ import annotations

import json
import os

import jax
import pytest

from ffcl_jax import compilation_cache
from tests.conftest import tiny_config
from tests.helpers.cli import run_python

# JAX writes only programs that took >= 1 s to compile (the tests' conftest: 0.5 s); on a loaded
# machine the tiny config's eval step may take less. 0 makes what is written independent of the
# machine's load. The tests' shared cache (conftest's JAX_COMPILATION_CACHE_DIR) is left out, so
# that the run's own default, WORKDIR/compilation_cache, is what these runs use.
EVERY_PROGRAM = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_COMPILATION_CACHE_DIR": "",
}
TINY_RUN = [
    "-m",
    "ffcl_jax.main",
    "--config=configs/fashion_mnist.py:smoke",
    "--config.teacher=resnet8",
    "--config.train_examples=64",
    "--config.test_examples=40",
    "--config.batch_size=32",
    "--config.eval_batch_size=40",
    "--config.num_epochs=1",
    "--config.lr_decay_epochs=(3,)",
]


def test_the_config_names_the_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(compilation_cache, "current", lambda: None)  # a process without a cache
    config = tiny_config(".")
    assert config.compilation_cache_dir is None
    assert compilation_cache.directory(config, tmp_path) == str(tmp_path / "compilation_cache")
    assert compilation_cache.directory(config) is None  # no workdir, no folder to put it in
    for off in ("", "none", "None"):
        config.compilation_cache_dir = off
        assert compilation_cache.directory(config, tmp_path) is None
    config.compilation_cache_dir = "gs://bucket/jax_cache"
    assert compilation_cache.directory(config, tmp_path) == "gs://bucket/jax_cache"
    config.compilation_cache_dir = "relative/cache"
    assert compilation_cache.directory(config, tmp_path) == os.path.abspath("relative/cache")
    assert compilation_cache.describe().startswith("persistent compilation cache off")
    # A process whose JAX already caches (JAX_COMPILATION_CACHE_DIR) keeps its cache by default.
    monkeypatch.setattr(compilation_cache, "current", lambda: "/shared/jax_cache")
    config.compilation_cache_dir = None
    assert compilation_cache.directory(config, tmp_path) == "/shared/jax_cache"
    config.compilation_cache_dir = "none"
    assert compilation_cache.directory(config, tmp_path) is None


def test_the_counter_counts_only_while_open():
    with compilation_cache.Counter() as counter:
        jax.monitoring.record_event(compilation_cache.HIT_EVENT)
        jax.monitoring.record_event(compilation_cache.WRITE_EVENT)
        jax.monitoring.record_event(compilation_cache.WRITE_EVENT)
        jax.monitoring.record_event("/jax/something/else")
        jax.monitoring.record_event_duration_secs(compilation_cache.SAVED_EVENT, 2.5)
    jax.monitoring.record_event(compilation_cache.HIT_EVENT)
    summary = counter.summary()
    assert (summary["hits"], summary["writes"]) == (1, 2)
    assert summary["compile_seconds_saved"] == 2.5


@pytest.mark.slow
def test_a_second_process_loads_the_steps_from_the_workdir_cache(tmp_path, fmnist_dir):
    """The first run compiles its steps and writes them to WORKDIR/compilation_cache; the same
    command again (`--fresh`, which moves the run aside but keeps the cache) loads them."""
    args = [*TINY_RUN, f"--config.idx_dir={fmnist_dir}", f"--workdir={tmp_path}"]
    cache_dir = tmp_path / "compilation_cache"
    first = run_python(*args, env=EVERY_PROGRAM)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"persistent compilation cache: {cache_dir}" in first.stdout
    written = json.loads((tmp_path / "results.json").read_text())["compilation_cache"]
    assert written["dir"] == str(cache_dir)
    assert written["hits"] == 0 and written["writes"] >= 2  # the train and eval steps at least
    assert len([p for p in cache_dir.iterdir() if p.name.endswith("-cache")]) >= 2

    second = run_python(*args, "--fresh", env=EVERY_PROGRAM)
    assert second.returncode == 0, second.stderr[-3000:]
    loaded = json.loads((tmp_path / "results.json").read_text())["compilation_cache"]
    assert loaded["hits"] >= 2 and loaded["hits"] >= written["writes"] - loaded["writes"]
    assert loaded["writes"] < written["writes"]


@pytest.mark.slow
def test_none_turns_the_cache_off(tmp_path, fmnist_dir):
    proc = run_python(
        *TINY_RUN,
        f"--config.idx_dir={fmnist_dir}",
        f"--workdir={tmp_path}",
        "--config.compilation_cache_dir=none",
        env=EVERY_PROGRAM,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "persistent compilation cache off" in proc.stdout
    assert not (tmp_path / "compilation_cache").exists()
    summary = json.loads((tmp_path / "results.json").read_text())["compilation_cache"]
    assert summary == {"dir": None, "hits": 0, "writes": 0, "compile_seconds_saved": 0.0}
