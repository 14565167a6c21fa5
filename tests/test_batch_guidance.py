"""Per-chip batch guidance: the warning for fewer than 128 images a TPU chip, in the trainer and
in `compile_for`, and compile_for's fixed bytes (the state) beside its per-image bytes. No TPU:
the trainer is told its mesh is a TPU's, compile_for compiles for the CPU with a TPU's figures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from ffcl_jax import compile_for, parallel, train
from ffcl_jax.parallel import TPU_LANES, small_batch_warning
from tests.conftest import tiny_config

FAKE_V5E = compile_for.Chip("v5e", 197e12, 16 * 2**30, 819e9, "https://cloud.google.com/tpu/")


def test_fewer_than_128_images_a_tpu_chip_get_one_line_saying_what_it_costs():
    warning = small_batch_warning(256, 4, "tpu")  # 64 images a chip
    assert warning is not None and "\n" not in warning
    assert warning.startswith("warning: 64 images a chip (batch_size 256 over 4 chips)")
    assert f"{TPU_LANES}-lane tiles" in warning
    assert "(2x those of 64)" in warning  # the bytes of 128 images for the work of 64
    assert f"batch_size >= {4 * TPU_LANES}" in warning
    assert "(5.33x those of 24)" in small_batch_warning(96, 4, "tpu")
    assert small_batch_warning(4 * TPU_LANES, 4, "tpu") is None
    assert small_batch_warning(4 * TPU_LANES + 4, 4, "tpu") is None
    for platform in ("cpu", "gpu"):  # no lane padding of the batch there
        assert small_batch_warning(256, 4, platform) is None


@pytest.mark.slow
def test_compile_for_warns_and_reports_the_fixed_bytes_beside_the_per_image_bytes(
    fmnist_dir, monkeypatch
):
    monkeypatch.setattr(compile_for, "chip_of", lambda devices: FAKE_V5E)
    config = tiny_config(fmnist_dir)  # 32 images on one chip
    report = compile_for.compile_for(config, jax.devices()[:1], "v5e:test")
    assert report["warnings"] == [small_batch_warning(32, 1, "tpu")]

    method = train.check_config(config, 1)
    _, state = train.build(config, method, 10)
    sizes = {
        name: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(getattr(state, name)))
        for name in ("params", "opt_state", "batch_stats")
    }
    fixed = report["fixed_bytes"]
    assert fixed["weights"] == sizes["params"] == report["parameter_bytes"] > 0
    # SGD with momentum keeps one trace per trained parameter (FFCL freezes none), besides the
    # schedule's step counters.
    assert fixed["optimizer_state"] == sizes["opt_state"]
    traces = [x for x in jax.tree.leaves(state.opt_state) if x.dtype == jnp.float32]
    assert sum(x.size * x.dtype.itemsize for x in traces) == fixed["weights"]
    assert fixed["batch_norm_statistics"] == sizes["batch_stats"] > 0
    assert fixed["total"] == sum(v for k, v in fixed.items() if k != "total")
    step = report["train_step"]
    assert step["per_chip_batch"]["image"][0] == 32
    assert step["bytes_accessed_per_image"] * 32 == pytest.approx(step["bytes_accessed"])

    text = compile_for.format_report(report)
    lines = text.splitlines()
    assert lines[2] == report["warnings"][0]
    assert f"fixed per chip, whatever the batch: state {fixed['total'] / 2**20:.1f} MiB" in text
    assert f"({step['bytes_accessed_per_image'] / 1e6:.2f} MB an image)" in text


@pytest.mark.slow
def test_the_trainer_warns_on_a_tpu_mesh_with_few_images_a_chip(
    fmnist_dir, tmp_path, monkeypatch, capsys
):
    class TpuMesh(parallel.DataParallel):
        """The CPU's devices, which the trainer is told are a TPU's."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.platform = "tpu"

    monkeypatch.setattr(train, "DataParallel", TpuMesh)
    config = tiny_config(fmnist_dir, num_epochs=1, train_examples=64, test_examples=40)
    train.train_and_evaluate(config, str(tmp_path / "tpu"))
    printed = capsys.readouterr().out.splitlines()
    assert printed.count(small_batch_warning(32, 1, "tpu")) == 1

    monkeypatch.setattr(train, "DataParallel", parallel.DataParallel)
    train.train_and_evaluate(config, str(tmp_path / "cpu"))
    assert "warning:" not in capsys.readouterr().out
