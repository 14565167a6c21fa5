"""`config.scan_blocks`: each stage's identical blocks as one `jax.lax.scan`. The same numbers
as the unrolled blocks (forward, BatchNorm statistics, gradients, a whole train step), the same
train state, checkpoint and export layout, and a checkpoint resumes across the switch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from ffcl_jax import checkpoint, export, train, xla_cpu
from ffcl_jax.models.layers import LayerKernels
from tests.conftest import REPO, tiny_config
from tests.helpers import tiers
from tests.helpers.model_runs import float64_model_run


def _model_run(name: str, scan: bool, training: bool):
    """Whether the traced step holds a scan, and its loss, outputs, statistics and gradients, in
    float64, and the initial statistics."""
    text, result, stats = float64_model_run(name, LayerKernels(scan_blocks=scan), training)
    return "scan[" in text, result, stats


@pytest.mark.parametrize(
    "case",
    tiers.cases(
        [("resnet20", True), ("resnet20", False), ("wrn_40_1", True), ("resnet32x4", True)],
        ["resnet20-train"],
        ids=["resnet20-train", "resnet20-eval", "wrn_40_1-train", "resnet32x4-train"],
    ),
)
def test_scanned_stages_compute_what_the_unrolled_blocks_do(case):
    name, training = case
    with jax.enable_x64(True):
        unrolled_scan, unrolled, initial_stats = _model_run(name, False, training)
        scanned_scan, scanned, _ = _model_run(name, True, training)
    assert (unrolled_scan, scanned_scan) == (False, True)
    assert {a.dtype for a in jax.tree.leaves(scanned)} == {np.dtype(np.float64)}
    chex.assert_trees_all_close(scanned, unrolled, rtol=1e-10, atol=1e-12)
    (_, (_, _, stats)), _ = scanned
    moved = [
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(initial_stats), strict=True)
    ]
    # Training updates every block's running statistics (those inside the loop included);
    # evaluation none.
    assert all(moved) if training else not any(moved)


def test_a_stage_of_two_blocks_has_nothing_to_scan():
    with jax.enable_x64(True):
        scanned, _, _ = _model_run("resnet14", True, True)  # two blocks a stage: the first differs
    assert not scanned


def test_the_accelerator_variants_turn_it_on_and_the_cpu_default_leaves_it_off():
    from configs.cifar100 import get_config

    assert not get_config().scan_blocks
    assert get_config("gpu").scan_blocks and get_config("tpu").scan_blocks
    assert xla_cpu.layer_kernels(get_config("tpu"), 1, "tpu").scan_blocks
    assert not xla_cpu.layer_kernels(get_config(), 1, "cpu").scan_blocks


def _one_step(fmnist_dir, scan: bool, state=None, **overrides):
    overrides = {"teacher": "wrn_40_1", "student": "resnet20", **overrides}
    config = tiny_config(fmnist_dir, scan_blocks=scan, **overrides)
    config.cpu.kernels = "xla"
    method = train.check_config(config, 1)
    setup, initial = train.build(config, method, 2)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (32, 28, 28, 1)).astype(np.uint8),
        "label": rng.integers(0, 10, 32).astype(np.int32),
    }
    new_state, metrics = jax.jit(setup.train_step)(initial if state is None else state, batch)
    return config, initial, new_state, metrics


@pytest.mark.slow
def test_one_train_step_is_the_same_with_and_without_scan(fmnist_dir):
    """FFCL's whole step (every loss term, gradients, Nesterov SGD, BatchNorm statistics) with
    a WRN-40-1 teacher and a ResNet-20 student: the same state and loss either way."""
    _, initial_off, state_off, metrics_off = _one_step(fmnist_dir, False)
    _, initial_on, state_on, metrics_on = _one_step(fmnist_dir, True)
    chex.assert_trees_all_equal(initial_on, initial_off)  # the same layout and weights
    chex.assert_trees_all_close(metrics_on, metrics_off, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(state_on, state_off, rtol=1e-5, atol=1e-6)
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), state_on.params, initial_on.params)
    assert all(jax.tree.leaves(moved))  # a step that moved every parameter, not a no-op


@pytest.mark.slow
def test_a_checkpoint_resumes_across_the_switch_and_exports_one_layout(fmnist_dir, tmp_path):
    """A run saved without the scan resumes with it (no config refusal, the same arrays), and
    the other way round; the export and the checkpoint tree are the same either way."""
    config_off, _, state_off, _ = _one_step(fmnist_dir, False)
    config_on, initial_on, state_on, _ = _one_step(fmnist_dir, True)
    assert checkpoint.saved_tree(state_on).keys() == checkpoint.saved_tree(state_off).keys()
    assert sorted(export.flatten(checkpoint.saved_tree(state_on))) == sorted(
        export.flatten(checkpoint.saved_tree(state_off))
    )
    for saved_with, state, resumed_with, like in (
        (config_off, state_off, config_on, initial_on),
        (config_on, state_on, config_off, initial_on),
    ):
        workdir = tmp_path / f"scan_{saved_with.scan_blocks}"
        meta = {"config": json.loads(saved_with.to_json_best_effort()), "progress": {}}
        with checkpoint.RunCheckpoints(str(workdir), saved_with) as checkpoints:
            checkpoints.save(1, state, meta, {saved_with.best_metric: 0.5})
        with checkpoint.RunCheckpoints(str(workdir), resumed_with) as checkpoints:
            checkpoints.check_config(1, checkpoints.read_meta(1), resumed_with)
            restored = checkpoints.restore_state(1, like)
        chex.assert_trees_all_equal(restored, state)
    # The resumed state trains on under the other setting as it would have under its own.
    _, _, resumed, _ = _one_step(fmnist_dir, True, state_off)
    _, _, straight, _ = _one_step(fmnist_dir, False, state_off)
    chex.assert_trees_all_close(resumed, straight, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_branch_methods_scan_their_branches_stages(fmnist_dir):
    """ONE runs the stages of its branches one at a time (models/branches.py): a step in
    float64, where the two forms agree to rounding."""
    with jax.enable_x64(True):
        steps = [
            _one_step(fmnist_dir, scan, method="one", student="resnet20", compute_dtype="float64")
            for scan in (False, True)
        ]
    (_, _, state_off, metrics_off), (_, _, state_on, metrics_on) = steps
    chex.assert_trees_all_close(metrics_on, metrics_off, rtol=1e-10, atol=1e-12)
    chex.assert_trees_all_close(state_on, state_off, rtol=1e-10, atol=1e-12)


PER_DEVICE_CODE = """
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, numpy as np
from configs.fashion_mnist import get_config
from ffcl_jax import parallel, train
mesh = parallel.DataParallel(-1)
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (32, 28, 28, 1)).astype(np.uint8)
labels = rng.integers(0, 10, 32).astype(np.int32)
result = {}
for mode in ("per_device", "groups:2"):
    out = []
    for scan in (False, True):
        config = get_config()
        config.scan_blocks, config.batch_norm, config.batch_size = scan, mode, 32
        config.cpu.kernels = "xla"
        setup, state = train.build(config, train.check_config(config, 2), 10, mesh)
        step, _ = train.jit_steps(setup, config)
        with jax.set_mesh(mesh.mesh):
            out.append(step(jax.device_put(state, mesh.replicated),
                            mesh.global_batch({"image": images, "label": labels})))
    gaps = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), *out)
    result[mode] = max(jax.tree.leaves(gaps))
print("RESULT " + json.dumps(result))
"""


@pytest.mark.slow
def test_per_device_and_grouped_batch_norm_scan_alike():
    """Under shard_map (per-device and grouped statistics, 2 forced CPU devices), the scanned
    stages give the unrolled step to float32 rounding: the demo pair, ResNet-20 scanned."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    done = subprocess.run(
        [sys.executable, "-c", PER_DEVICE_CODE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    gaps = json.loads(line[len("RESULT ") :])
    assert set(gaps) == {"per_device", "groups:2"}
    assert all(gap <= 1e-5 for gap in gaps.values()), gaps
