"""Checkpoints: exact resume after SIGKILL or SIGTERM, kills during a save, retention, bad or
foreign checkpoints, --fresh, and the NaN guard keeping the last good checkpoint."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ffcl_jax import checkpoint, export, train
from ffcl_jax.errors import UserError
from tests.conftest import tiny_config
from tests.helpers.checkpoint_runs import (
    CLI_ARGS,
    EPOCHS,
    PREEMPT_IN_EPOCH_3,
    STEPS_PER_EPOCH,
    assert_same_state,
    run,
)


def final_state(workdir) -> tuple[int, dict[str, np.ndarray]]:
    checkpoints, step = checkpoint.open_finished_run(str(workdir), tiny_config("."))
    with checkpoints:
        return step, export.flatten(checkpoints.restore_raw_state(step))


def metric_rows(workdir) -> list[dict]:
    """metrics.jsonl without its timing fields, which differ from run to run."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [{k: v for k, v in row.items() if k != "img_per_sec"} for row in rows]


@pytest.fixture(scope="module")
def straight_run(fmnist_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight") / "run"
    proc = run(*CLI_ARGS, f"--config.idx_dir={fmnist_dir}", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["after", "during"])
def test_a_run_killed_at_a_checkpoint_resumes_bit_for_bit(straight_run, fmnist_dir, tmp_path, mode):
    """SIGKILL once epoch 2's checkpoint is written ("after"), or while it is being written
    ("during": the previous checkpoint must then be the one resumed); the resumed run ends
    with exactly the straight run's parameters, statistics, optimizer state and metrics."""
    workdir = tmp_path / "killed"
    args = [*CLI_ARGS, f"--config.idx_dir={fmnist_dir}", f"--workdir={workdir}"]
    kill_step = 2 * STEPS_PER_EPOCH
    proc = run(*args, entry=("tests/helpers/kill_at_checkpoint.py", str(kill_step), mode))
    assert proc.returncode == -9, proc.stderr[-3000:]
    directory = workdir / "checkpoints"
    with checkpoint.RunCheckpoints(str(workdir), tiny_config("."), read_only=True) as saved:
        latest = saved.latest_step()
    if mode == "during":
        # The interrupted save is left as a temporary folder that orbax never lists.
        assert any(name.startswith(f"{kill_step}.") for name in os.listdir(directory))
        assert latest == STEPS_PER_EPOCH
    else:
        assert latest == kill_step

    proc = run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from checkpoint step {latest}" in proc.stdout
    step, resumed = final_state(workdir)
    straight_step, straight = final_state(straight_run)
    assert step == straight_step == EPOCHS * STEPS_PER_EPOCH
    assert_same_state(resumed, straight)
    assert metric_rows(workdir) == metric_rows(straight_run)
    results = json.loads((workdir / "results.json").read_text())
    assert results["history"] == json.loads((straight_run / "results.json").read_text())["history"]
    assert results["resumed_at_steps"] == [latest]


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_and_resumes_exactly(straight_run, fmnist_dir, tmp_path):
    """A preemption notice (SIGTERM) in the middle of epoch 3 saves the step it reached, exits
    with 143, and the rerun continues inside the epoch to the straight run's exact result."""
    workdir = tmp_path / "preempted"
    args = [*CLI_ARGS, f"--config.idx_dir={fmnist_dir}", f"--workdir={workdir}"]
    proc = run(*args, entry=("-c", PREEMPT_IN_EPOCH_3))
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "preempted at step 10" in proc.stderr
    with checkpoint.RunCheckpoints(str(workdir), tiny_config("."), read_only=True) as saved:
        assert saved.latest_step() == 2 * STEPS_PER_EPOCH + 2
        meta = saved.read_meta(saved.latest_step())
    assert meta["progress"]["epoch"] == 2 and meta["progress"]["batch_in_epoch"] == 2

    proc = run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from checkpoint step 10 (epoch 2, batch 2)" in proc.stdout
    assert_same_state(final_state(workdir)[1], final_state(straight_run)[1])
    evals = [r for r in metric_rows(workdir) if r["kind"] == "eval"]
    assert evals == [r for r in metric_rows(straight_run) if r["kind"] == "eval"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["kdcl", "pcl", "mcl", "switokd", "ffsd"])
def test_a_preempted_kdcl_or_pcl_run_resumes_bit_for_bit(method, fmnist_dir, tmp_path):
    """Their per-member views (drawn from the example's position) and PCL's temporal mean (its
    weights and BatchNorm statistics are in the checkpoint) continue exactly after a SIGTERM in
    the middle of epoch 3."""
    args = [*CLI_ARGS, f"--config.idx_dir={fmnist_dir}", f"--config.method={method}"]
    straight = tmp_path / "straight"
    proc = run(*args, f"--workdir={straight}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    preempted = tmp_path / "preempted"
    proc = run(*args, f"--workdir={preempted}", entry=("-c", PREEMPT_IN_EPOCH_3))
    assert proc.returncode == 143, proc.stderr[-3000:]
    proc = run(*args, f"--workdir={preempted}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from checkpoint step 10 (epoch 2, batch 2)" in proc.stdout
    resumed, reference = final_state(preempted)[1], final_state(straight)[1]
    assert any(k.startswith("mean_params") for k in reference) == (method == "pcl")
    assert_same_state(resumed, reference)
    evals = [r for r in metric_rows(preempted) if r["kind"] == "eval"]
    assert evals == [r for r in metric_rows(straight) if r["kind"] == "eval"]


def _tiny_run(fmnist_dir, workdir, **overrides):
    config = tiny_config(fmnist_dir, **{"train_examples": 128, **overrides})
    return config, train.train_and_evaluate(config, str(workdir))


def _listing(workdir) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(root, name), workdir): os.path.getsize(
            os.path.join(root, name)
        )
        for root, _, names in os.walk(workdir)
        for name in names
    }


@pytest.mark.slow
def test_keeps_the_last_k_and_the_best(fmnist_dir, tmp_path):
    config, results = _tiny_run(
        fmnist_dir, tmp_path / "w", num_epochs=4, keep_checkpoints=1, best_metric="teacher"
    )
    with checkpoint.RunCheckpoints(str(tmp_path / "w"), config, read_only=True) as saved:
        steps = set(saved.manager.all_steps())
    history = results["history"]
    best_row = max(history, key=lambda r: r["teacher"])  # first epoch reaching the maximum
    assert steps == {history[-1]["step"], best_row["step"]}
    assert results["best_checkpoint"]["step"] == best_row["step"]


@pytest.mark.slow
def test_another_config_is_refused_and_nothing_is_touched(fmnist_dir, tmp_path):
    workdir = tmp_path / "w"
    _tiny_run(fmnist_dir, workdir)
    before = _listing(workdir)
    for overrides, message in (
        ({"student": "resnet14"}, "student='resnet8' in the checkpoint but 'resnet14' now"),
        ({"loss.tau": 2.0}, "loss.tau=3.0 in the checkpoint but 2.0 now"),  # FFCL's default
        ({"batch_size": 64}, "batch_size=32 in the checkpoint but 64 now"),
    ):
        with pytest.raises(UserError, match="written with another config") as info:
            _tiny_run(fmnist_dir, workdir, **overrides)
        assert message in str(info.value)
    assert _listing(workdir) == before
    # Keys that do not change what was computed may change: a longer run continues.
    _, results = _tiny_run(fmnist_dir, workdir, num_epochs=3, log_every_steps=1)
    assert [r["epoch"] for r in results["history"]] == [1, 2, 3]


def _corrupt_arrays(workdir) -> None:
    step_dir = os.path.join(workdir, "checkpoints", "4", "state")
    for root, _, names in os.walk(step_dir):
        for name in names:
            if name not in ("_METADATA", "_CHECKPOINT_METADATA", "commit_success.txt"):
                path = os.path.join(root, name)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)


def _old_format(workdir) -> None:
    path = os.path.join(workdir, "checkpoints", "4", "meta", "metadata")
    meta = json.loads(open(path).read())
    meta["format_version"] = 0
    with open(path, "w") as f:
        json.dump(meta, f)


def _other_model(workdir) -> None:
    # Same config, different network in the arrays: as if files from another run were copied in.
    path = os.path.join(workdir, "checkpoints", "4", "meta", "metadata")
    meta = json.loads(open(path).read())
    meta["config"]["student"] = "resnet14"
    with open(path, "w") as f:
        json.dump(meta, f)


def test_keys_added_later_resume_at_their_old_behaviour(fmnist_dir):
    config = tiny_config(fmnist_dir)
    saved = checkpoint.flat_config(config)
    for key in checkpoint.ADDED_KEYS:  # a checkpoint written before these keys existed
        saved.pop(key)
    assert checkpoint.config_differences(saved, config) == []
    config.data_on_device = True  # not what such a run did: refused
    assert checkpoint.config_differences(saved, config) == [
        "data_on_device=False in the checkpoint but True now"
    ]
    # Such runs set loss.rampup_epochs for every method. Settings compare as they resolve: the
    # protocol's ramp-up of the same length is no difference, one of another length is.
    config.data_on_device, config.loss.rampup_epochs = False, None
    assert config.protocol_rampup_epochs == 1.0
    assert checkpoint.config_differences(saved, config) == []
    config.protocol_rampup_epochs = 2.0
    assert checkpoint.config_differences(saved, config) == [
        "loss.rampup_epochs=1.0 in the checkpoint but 2.0 now"
    ]


def test_config_json_shows_the_method_settings_a_run_resolved(fmnist_dir):
    from ffcl_jax import methods

    config = tiny_config(fmnist_dir)
    method = methods.create(config.method, config.loss, config.protocol_rampup_epochs)
    written = json.loads(checkpoint.config_as_run(config, method))
    assert config.loss.tau is None and written["loss"]["tau"] == method.settings.tau
    assert written["loss"]["rampup_epochs"] == 1.0
    assert checkpoint.config_differences(written, config) == []
    config.loss.tau = method.settings.tau + 1.0  # a setting changed from its default
    assert checkpoint.config_differences(written, config) == [
        f"loss.tau={method.settings.tau!r} in the checkpoint but {config.loss.tau!r} now"
    ]


# A failed restore leaves orbax's background callbacks to report the same failure again.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "damage, overrides, message",
    [
        (_corrupt_arrays, {}, "is damaged (its array files are truncated or garbled"),
        (_old_format, {}, "has checkpoint format 0, this version of ffcl_jax reads format 1"),
        (_other_model, {"student": "resnet14"}, "differ from this model's at batch_stats.student"),
    ],
)
def test_damaged_or_foreign_checkpoints_fail_clearly_and_are_kept(
    fmnist_dir, tmp_path, damage, overrides, message
):
    workdir = tmp_path / "w"
    _tiny_run(fmnist_dir, workdir, num_epochs=1)
    damage(str(workdir))
    before = _listing(workdir)
    with pytest.raises(UserError) as info:
        _tiny_run(fmnist_dir, workdir, num_epochs=2, **overrides)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert "--fresh" in str(info.value)
    assert _listing(workdir) == before
    if damage is _corrupt_arrays:  # the command line says it in one line, and exits with 2
        proc = run(
            "--config=configs/fashion_mnist.py",
            f"--config.idx_dir={fmnist_dir}",
            "--config.teacher=resnet8",
            "--config.train_examples=128",
            "--config.batch_size=32",
            "--config.eval_batch_size=50",
            "--config.num_epochs=2",
            "--config.lr_decay_epochs=(1,)",
            "--config.log_every_steps=2",
            "--config.augment=none",
            "--config.loss.rampup_epochs=1.0",
            f"--workdir={workdir}",
        )
        assert proc.returncode == 2
        # The last line says it all (the storage library's threads may print their own report
        # of the damage before it).
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("error: checkpoint step 4 in") and message in line
        assert _listing(workdir) == before


@pytest.mark.slow
def test_fresh_moves_the_old_run_aside(fmnist_dir, tmp_path):
    workdir = tmp_path / "w"
    _tiny_run(fmnist_dir, workdir, num_epochs=1)
    old = _listing(workdir)
    config = tiny_config(fmnist_dir, train_examples=128, num_epochs=1)
    train.train_and_evaluate(config, str(workdir), fresh=True)
    (previous,) = os.listdir(workdir / "previous_runs")
    moved = _listing(workdir / "previous_runs" / previous)
    note = moved.pop("moved.txt")  # what was moved, from where, when
    assert moved == old and note > 0
    assert (workdir / "results.json").exists() and (workdir / "checkpoints").exists()


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(fmnist_dir, tmp_path):
    """The lr jumps to 1e29 after epoch 1: the loss overflows in epoch 2; the run stops naming
    the step, writes no checkpoint of the broken state, and epoch 1's stays restorable."""
    workdir = tmp_path / "w"
    with pytest.raises(UserError) as info:
        _tiny_run(fmnist_dir, workdir, lr_decay_factor=1e30, lr_decay_epochs=(1,))
    message = str(info.value)
    assert "non-finite loss at step" in message and "ce_teacher=" in message
    bad_step = int(message.split("non-finite loss at step ")[1].split()[0])
    assert bad_step > 4
    assert "the last good checkpoint (step 4) is kept" in message
    step, state = final_state(workdir)
    assert step == 4 and all(np.isfinite(v).all() for v in state.values())
