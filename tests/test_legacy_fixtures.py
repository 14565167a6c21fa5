"""Runs written by an earlier version (tests/data/legacy_v1, see its README) still restore,
export the same student, load for inference and resume."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from configs.fashion_mnist import get_config
from ffcl_jax import checkpoint, datasets, export, train
from tests.conftest import REPO

LEGACY = os.path.join(REPO, "tests", "data", "legacy_v1")
FMNIST = "/usr/share/datasets/fashion-mnist"
needs_data = pytest.mark.skipif(
    not os.path.exists(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz")),
    reason="needs Debian's dataset-fashion-mnist (bash scripts/setup.sh installs it)",
)


def legacy_config(method: str, **overrides):
    """The config the fixture's run was made with (its README's command)."""
    config = get_config("smoke")
    config.method = method
    config.teacher = "resnet8"
    config.train_examples = 64
    config.test_examples = 50
    config.num_epochs = 1
    config.keep_checkpoints = 1
    config.best_metric = ""
    # The version that wrote them set the smoke ramp-up as a loss setting of every method.
    config.protocol_rampup_epochs = None
    config.loss.rampup_epochs = 1.0
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(params=["ffcl", "pcl"])
def legacy_run(request, tmp_path):
    workdir = tmp_path / request.param
    shutil.copytree(os.path.join(LEGACY, request.param), workdir)
    return request.param, workdir


def test_legacy_checkpoint_restores_into_todays_state(legacy_run):
    method, workdir = legacy_run
    config = legacy_config(method)
    run_method = train.check_config(config, 1)
    _, state = train.build(config, run_method, steps_per_epoch=1)
    checkpoints, step = checkpoint.open_finished_run(str(workdir), config)
    try:
        meta = checkpoints.read_meta(step)
        checkpoints.check_config(step, meta, config)
        restored = checkpoints.restore_state(step, state)
    finally:
        checkpoints.close()
    assert int(restored.step) == step == 1
    assert (restored.method_state is not None) == (method == "pcl")
    exported = export.read_export(str(workdir / "export.npz"))
    flat_params, flat_stats = exported.network("student")
    saved = checkpoint.saved_tree(restored)
    for kind, flat in (("params", flat_params), ("batch_stats", flat_stats)):
        ours = export.flatten(run_method.deployed_weights(saved, kind)["student"])
        assert sorted(ours) == sorted(flat)
        for key, value in flat.items():
            np.testing.assert_array_equal(ours[key], value, err_msg=key)


@needs_data
def test_legacy_export_predicts_its_recorded_accuracy(legacy_run):
    method, workdir = legacy_run
    with open(workdir / "results.json") as f:
        recorded = json.load(f)["history"][-1]["student"]
    _, predict, meta = export.load_exported(str(workdir / "export.npz"))
    images, labels = datasets.load_idx_split(FMNIST, "test")
    images, labels = images[:50], labels[:50]
    accuracy = float(np.mean(np.argmax(np.asarray(predict(images)), -1) == labels))
    assert meta["config"]["method"] == method
    assert accuracy == pytest.approx(recorded, abs=1e-9)


@needs_data
@pytest.mark.slow
def test_legacy_run_resumes(legacy_run):
    method, workdir = legacy_run
    results = train.train_and_evaluate(legacy_config(method, num_epochs=2), str(workdir))
    assert results["resumed_at_steps"] == [1]
    assert [row["epoch"] for row in results["history"]] == [1, 2]


def test_a_run_written_with_the_cpu_settings_grouped_resumes(legacy_run):
    """The version between the fixture's and today's kept its CPU settings under `cpu`,
    BatchNorm's backward among them; today's top-level `batch_norm_backward` reads it."""
    method, workdir = legacy_run
    path = workdir / "config.json"
    written = json.loads(path.read_text())
    written["cpu"] = {
        "ynn_fusion": written.pop("xla_cpu_ynn_fusion"),
        "batch_norm_backward": written.pop("batch_norm_backward"),
        "flatten_after_fusion": written.pop("xla_cpu_flatten_after_fusion"),
        "kernels": written.pop("cpu_kernels"),
    }
    path.write_text(json.dumps(written))
    # Unread, `cpu.batch_norm_backward` would be a key today's config lacks: a refused resume.
    assert checkpoint.config_differences(written, legacy_config(method)) == []
    results = train.train_and_evaluate(legacy_config(method, num_epochs=2), str(workdir))
    assert results["resumed_at_steps"] == [1]
