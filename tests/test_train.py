"""The compiled cohort step, the optimizer, evaluation, and end-to-end runs (library and CLI)."""

from __future__ import annotations

import json
import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ffcl_jax import (
    cpu_kernels,
    datasets,
    input_pipeline,
    machine,
    parallel,
    process_env,
    report,
    train,
    xla_cpu,
)
from ffcl_jax.errors import UserError
from ffcl_jax.optimizer import make_optimizer
from tests.conftest import tiny_config
from tests.helpers.cli import run_python


def build(config, steps_per_epoch=4):
    method = train.check_config(config, jax.device_count())
    return train.build(config, method, steps_per_epoch)


def fixed_batch(fmnist_dir, n=32):
    images, labels = datasets.load_idx_split(fmnist_dir, "train")
    return {"image": images[:n], "label": labels[:n]}


def test_schedule_is_epoch_based_multistep(fmnist_dir):
    config = tiny_config(fmnist_dir, learning_rate=0.1, lr_decay_epochs=(3, 5))
    _, schedule = make_optimizer(config, 10, train.check_config(config, 1))
    lrs = [float(schedule(s)) for s in (0, 29, 30, 49, 50, 99)]
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_weight_decay_per_member_and_nesterov(fmnist_dir):
    config = tiny_config(
        fmnist_dir, learning_rate=0.1, weight_decay=1e-4, fusion_weight_decay=1e-5, momentum=0.9
    )
    _, state = build(config)
    tx, _ = make_optimizer(config, 4, train.check_config(config, 1))
    zero_grads = jax.tree.map(jnp.zeros_like, state.params)
    updates, _ = tx.update(zero_grads, tx.init(state.params), state.params)
    # First Nesterov step on gradient g = wd * p (torch.optim.SGD semantics): -lr (1 + mu) g.
    for role, wd in (("teacher", 1e-4), ("student", 1e-4), ("fusion", 1e-5)):
        for u, p in zip(
            jax.tree.leaves(updates[role]), jax.tree.leaves(state.params[role]), strict=True
        ):
            np.testing.assert_allclose(u, -0.1 * 1.9 * wd * p, rtol=1e-5, atol=1e-12)


def test_a_few_steps_lower_the_loss_and_update_batch_norm(fmnist_dir):
    config = tiny_config(fmnist_dir, learning_rate=0.05)
    setup, state = build(config, steps_per_epoch=1)
    step = jax.jit(setup.train_step, donate_argnums=0)
    batch = fixed_batch(fmnist_dir)
    stats_before = jax.tree.map(np.array, state.batch_stats)
    losses, totals = [], []
    for _ in range(12):
        state, metrics = step(state, batch)
        losses.append(float(metrics["ce_student"] + metrics["ce_teacher"]))
        totals.append(float(metrics["loss"]))
    # A wrong-signed or missing update leaves these flat or rising.
    assert losses[-1] < 0.9 * losses[0], losses
    assert totals[-1] < 0.9 * totals[0], totals
    assert sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= 9, losses
    assert int(state.step) == 12
    changed = jax.tree.map(
        lambda a, b: not np.allclose(a, b), stats_before, jax.tree.map(np.array, state.batch_stats)
    )
    assert all(jax.tree.leaves(changed))
    assert "kl_mutual" in setup.loss_terms  # every term: tests/test_methods.py
    expected_keys = set(setup.loss_terms) | {
        "loss",
        "rampup_weight",
        "learning_rate",
        "train_acc_teacher",
        "train_acc_student",
        "train_acc_fused",
    }
    assert set(metrics) == expected_keys
    assert all(np.ndim(v) == 0 for v in metrics.values())


@pytest.mark.slow
def test_bfloat16_compute_trains_with_float32_losses_and_parameters(fmnist_dir):
    config = tiny_config(fmnist_dir, compute_dtype="bfloat16", learning_rate=0.05)
    setup, state = build(config, steps_per_epoch=1)
    step = jax.jit(setup.train_step, donate_argnums=0)
    batch = fixed_batch(fmnist_dir)
    first = None
    for _ in range(6):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["loss"])
    assert all(v.dtype == jnp.float32 for v in metrics.values() if v.dtype != jnp.int32)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) < first
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


@pytest.mark.slow
def test_closed_form_batch_norm_backward_trains_like_autodiff(fmnist_dir):
    """Three steps of the whole cohort (both networks, fusion module) with each BatchNorm
    backward: the same training up to rounding, and not bit-identical (so the switch is used).
    On XLA's kernels: where `cpu.kernels` runs BatchNorm, the kernel has its own backward."""
    finals = {}
    for choice in ("autodiff", "closed_form"):
        config = tiny_config(
            fmnist_dir,
            learning_rate=0.05,
            **{"batch_norm_backward": choice, "cpu.kernels": "xla"},
        )
        setup, state = build(config, steps_per_epoch=1)
        step = jax.jit(setup.train_step, donate_argnums=0)
        for _ in range(3):
            state, metrics = step(state, fixed_batch(fmnist_dir))
        finals[choice] = (state, float(metrics["loss"]))
    (autodiff, loss_a), (closed, loss_c) = finals["autodiff"], finals["closed_form"]
    assert loss_c == pytest.approx(loss_a, rel=1e-4)
    for tree in ("params", "batch_stats"):
        a, c = jax.tree.leaves(getattr(autodiff, tree)), jax.tree.leaves(getattr(closed, tree))
        for x, y in zip(a, c, strict=True):
            np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-3, atol=2e-5)
    pairs = zip(jax.tree.leaves(autodiff.params), jax.tree.leaves(closed.params), strict=True)
    assert any(not np.array_equal(x, y) for x, y in pairs)


def test_closed_form_batch_norm_is_chosen_for_deep_networks_on_the_cpu(fmnist_dir):
    config = tiny_config(fmnist_dir)
    assert config.batch_norm_backward == "auto"
    config.teacher, config.student = "resnet20", "resnet8"  # 3 blocks a stage: autodiff
    assert not xla_cpu.closed_form_batch_norm(config)
    config.teacher = "resnet56"
    assert xla_cpu.closed_form_batch_norm(config) == (jax.default_backend() == "cpu")
    config.batch_norm_backward = "autodiff"
    assert not xla_cpu.closed_form_batch_norm(config)
    config.teacher, config.batch_norm_backward = "resnet8", "closed_form"
    assert xla_cpu.closed_form_batch_norm(config)


def test_no_recompilation_across_steps_epochs_and_lr_boundaries(fmnist_dir):
    config = tiny_config(fmnist_dir, lr_decay_epochs=(1,))
    setup, state = build(config, steps_per_epoch=2)
    traces = []

    def counted(state, batch):
        traces.append(1)
        return setup.train_step(state, batch)

    step = jax.jit(counted, donate_argnums=0)
    images, labels = datasets.load_idx_split(fmnist_dir, "train")
    for i in range(6):  # crosses two epoch boundaries, the ramp-up end and the lr decay
        batch = {"image": images[32 * i : 32 * (i + 1)], "label": labels[32 * i : 32 * (i + 1)]}
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    assert len(traces) == 1
    assert step._cache_size() == 1
    assert float(metrics["rampup_weight"]) == 1.0 and float(metrics["learning_rate"]) < 0.1


def test_state_is_donated(fmnist_dir):
    config = tiny_config(fmnist_dir)
    setup, state = build(config)
    step = jax.jit(setup.train_step, donate_argnums=0)
    old_leaf = jax.tree.leaves(state.params)[0]
    state, _ = step(state, fixed_batch(fmnist_dir))
    assert old_leaf.is_deleted()


@pytest.mark.slow
def test_evaluation_is_exact_over_a_partial_last_batch(fmnist_dir):
    config = tiny_config(fmnist_dir, eval_batch_size=16)
    setup, state = build(config)
    images, labels = datasets.load_idx_split(fmnist_dir, "test")
    images, labels = images[:37], labels[:37]
    mesh = parallel.DataParallel()
    eval_step = jax.jit(setup.eval_step)
    got = train.evaluate(eval_step, state, mesh, images, labels, config)
    cohort = nnx.merge(setup.graphdef, state.params, state.batch_stats)
    images_in = input_pipeline.normalize(jnp.asarray(images), setup.info)
    out = setup.method.forward(cohort, images_in, train=False)
    for name, logits in (
        ("teacher", out["teacher_logits"]),
        ("student", out["student_logits"]),
        ("fused", out["fused_logits"]),
        ("ensemble", (out["teacher_logits"] + out["student_logits"]) / 2),
    ):
        expected = float(np.mean(np.argmax(np.asarray(logits), -1) == labels))
        assert got[name] == pytest.approx(expected, abs=1e-9), name


@pytest.mark.slow
def test_train_and_evaluate_end_to_end(fmnist_dir, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(fmnist_dir, num_epochs=3, lr_decay_epochs=(2,))
    hooks = (sys.excepthook, sys.unraisablehook, threading.excepthook, os.environ.get("XLA_FLAGS"))
    results = train.train_and_evaluate(config, workdir)
    # Library code leaves the process alone: no hooks replaced, no XLA_FLAGS edited, and the
    # command it records is the caller's (none here), not sys.argv.
    assert hooks == (
        sys.excepthook,
        sys.unraisablehook,
        threading.excepthook,
        os.environ.get("XLA_FLAGS"),
    )
    assert results["command"] == ""
    for name in ("results.json", "metrics.jsonl", "curves.png", "config.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2, 3]
    assert sum(r["kind"] == "train" for r in rows) >= 3
    summary = results["summary"]
    assert set(summary) == {"student", "teacher", "fused", "ensemble"}
    for model, s in summary.items():
        assert s["last"] == evals[-1][model]
        assert s["best"] == max(r[model] for r in evals)
    # The toy classes are bright bands: three epochs learn them far above chance (10%).
    assert summary["teacher"]["best"] > 0.3
    assert results["train_img_per_sec"] > 0
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["summary"] == summary


def test_a_workdir_with_a_run_but_no_checkpoint_is_refused_and_left_alone(fmnist_dir, tmp_path):
    workdir = tmp_path / "used"
    workdir.mkdir()
    (workdir / "metrics.jsonl").write_text('{"kind": "eval"}\n')
    with pytest.raises(UserError, match="holds a run .metrics.jsonl. but neither a checkpoint"):
        train.train_and_evaluate(tiny_config(fmnist_dir), str(workdir))
    assert (workdir / "metrics.jsonl").read_text() == '{"kind": "eval"}\n'
    assert sorted(os.listdir(workdir)) == ["metrics.jsonl"]


@pytest.mark.slow
def test_a_run_that_died_before_its_first_checkpoint_restarts_unattended(fmnist_dir, tmp_path):
    """What a scheduler's restart loop does: the same command again. With the config the dead
    run recorded, its outputs go to previous_runs/ and the run starts over; with another
    config it is refused, naming the keys, and nothing is touched."""
    config = tiny_config(fmnist_dir)
    workdir = tmp_path / "restarted"
    workdir.mkdir()
    partial = '{"kind": "train", "step": 1}\n'
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    (workdir / "metrics.jsonl").write_text(partial)
    (workdir / "checkpoints").mkdir()  # orbax made it; nothing was saved in it

    other = tiny_config(fmnist_dir)
    other.learning_rate = 0.05
    with pytest.raises(UserError, match=r"learning_rate=0\.1 then but 0\.05 now"):
        train.train_and_evaluate(other, str(workdir))
    assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "metrics.jsonl"]

    train.train_and_evaluate(config, str(workdir))
    (moved,) = os.listdir(workdir / "previous_runs")
    assert (workdir / "previous_runs" / moved / "metrics.jsonl").read_text() == partial
    assert (workdir / "results.json").exists()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] >= 1 and rows[-1]["kind"] == "eval"


@pytest.mark.parametrize(
    "overrides, num_devices, message",
    [
        ({"batch_size": 30}, 4, "config.batch_size=30 must be a positive multiple of the 4"),
        ({"eval_batch_size": 0}, 1, "config.eval_batch_size must be > 0, got 0"),
        ({"teacher": "resnet9"}, 1, "unknown model 'resnet9'"),
        ({"dataset": "imagenet"}, 1, "unknown dataset 'imagenet'"),
        ({"method": "kd"}, 1, "set --config.teacher_checkpoint to the workdir of a finished"),
        ({"teacher_checkpoint": "/x"}, 1, "config.teacher_checkpoint is only read by method 'kd'"),
        ({"best_metric": "fused", "method": "dml"}, 1, "config.best_metric='fused' is not a"),
        ({"batch_norm": "sync"}, 1, "unknown config.batch_norm 'sync'"),
        ({"keep_checkpoints": 0}, 1, "config.keep_checkpoints must be >= 1"),
        ({"checkpoint_every_epochs": 0}, 1, "config.checkpoint_every_epochs must be > 0"),
        ({"compute_dtype": "float16"}, 1, "unknown compute_dtype 'float16'"),
        ({"compute_dtype": "float64"}, 1, "compute_dtype=float64 needs 64-bit JAX"),
        ({"lr_decay_epochs": (5, 2)}, 1, "lr_decay_epochs must be strictly increasing"),
        ({"lr_decay_epochs": (2, 2)}, 1, "lr_decay_epochs must be strictly increasing"),
        ({"eval_every_epochs": 0}, 1, "config.eval_every_epochs must be > 0"),
        ({"num_epochs": 0}, 1, "num_epochs must be > 0"),
        ({"batch_norm_backward": "fast"}, 1, "unknown config.batch_norm_backward 'fast'"),
        ({"cpu.ynn_fusion": "all"}, 1, "unknown config.cpu.ynn_fusion 'all'"),
    ],
)
def test_bad_configs_fail_clearly(fmnist_dir, overrides, num_devices, message):
    with pytest.raises(UserError) as info:
        train.check_config(tiny_config(fmnist_dir, **overrides), num_devices)
    assert message in str(info.value)


def test_feature_stage_out_of_range_fails_clearly(fmnist_dir):
    config = tiny_config(fmnist_dir, **{"loss.feat_stages": (0, 5)})
    method = train.check_config(config, 1)
    with pytest.raises(UserError, match="loss.feat_stages has stage 5"):
        train.create_cohort(config, method, datasets.dataset_info(config.dataset))


def test_batch_larger_than_the_data_set_fails_clearly():
    with pytest.raises(UserError, match="lower config.batch_size"):
        input_pipeline.steps_per_epoch(100, 128)


def test_non_finite_loss_names_the_first_bad_step_and_its_terms(tmp_path):
    good = {"loss": 1.0, "ce_student": 1.0, "learning_rate": 0.1}
    bad = {"loss": float("nan"), "ce_student": 2.0, "learning_rate": 0.1}
    with pytest.raises(UserError) as info:
        report.summarize_interval([good, bad, bad], 16, str(tmp_path), "step 8")
    message = str(info.value)
    assert "step 17" in message and "ce_student=2" in message and str(tmp_path) in message
    assert "last good checkpoint (step 8) is kept" in message
    assert report.summarize_interval([good, good], 16, str(tmp_path), None)["loss"] == 1.0


def test_the_loss_panel_shows_every_weighted_term_and_nothing_else():
    """Every term of the objective gets its curve (the panel is log-scaled, so a term 1e4
    times smaller than the regularizer still shows); the ramp-up weight and the learning rate,
    which are logged beside the terms, are not losses."""
    terms = ("ce_teacher", "ce_student", "kl_mutual", "reg")
    rows = [
        {"step": s, "loss": 9.0, "rampup_weight": 0.5, "learning_rate": 0.1, "train_acc_student": 1}
        | {t: 10.0**-i for i, t in enumerate(terms)}
        for s in (10, 20)
    ]
    curves = report.loss_curves(rows, terms)
    assert list(curves) == ["total loss", *terms]
    assert curves["reg"] == ([10, 20], [10.0 ** -terms.index("reg")] * 2)
    assert list(report.loss_curves(rows)) == ["total loss"]


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),  # one task: one process
        ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, True),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
        ({"TPU_WORKER_HOSTNAMES": "t1v-0"}, False),  # single-host TPU VM
        ({"TPU_WORKER_HOSTNAMES": "t1v-0,t1v-1"}, True),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ],
)
def test_distributed_start_only_for_several_processes(env, expected):
    from ffcl_jax.main import multi_process_environment

    assert multi_process_environment(env) is expected


def run_cli(*args, **env_overrides):
    return run_python("-m", "ffcl_jax.main", *args, env=env_overrides)


def run_smoke_cli(fmnist_dir, workdir, *args, **env_overrides):
    """The `:smoke` config through the CLI, on the toy data: 128 training, 70 test images."""
    return run_cli(
        "--config=configs/fashion_mnist.py:smoke",
        f"--config.idx_dir={fmnist_dir}",
        "--config.train_examples=128",
        "--config.test_examples=70",
        *args,
        f"--workdir={workdir}",
        **env_overrides,
    )


@pytest.mark.slow
def test_cli_runs_a_preset_with_overrides(fmnist_dir, tmp_path):
    workdir = tmp_path / "cli"
    proc = run_smoke_cli(fmnist_dir, workdir, "--config.method=dml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "method dml" in proc.stdout and "img/s" in proc.stdout and "ETA" in proc.stdout
    assert "batch 64, float32 compute |" in proc.stdout  # the banner names the precision
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == [  # DML has no fusion module
        "student",
        "teacher",
        "ensemble",
    ]
    assert "dml settings (--config.loss.<name>=...): use_fusion=False," in proc.stdout
    results = json.loads((workdir / "results.json").read_text())
    assert results["config"]["method"] == "dml"
    assert results["loss_terms"] == ["ce_teacher", "ce_student", "kl_mutual"]
    # What the "auto" settings resolved to for these shallow networks on the CPU backend.
    assert results["xla_compiler_options"] == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"
    }
    assert results["closed_form_batch_norm"] is False
    auto_onednn = cpu_kernels.available()
    assert results["onednn_kernels"] is auto_onednn  # what "auto" resolved to
    # The machine kind, in results.json and the header: CPU speed depends on it.
    isa = machine.machine()["isa"]
    assert results["machine"]["isa"] == isa and results["machine"]["cores"] == os.cpu_count()
    kernels = "oneDNN" if auto_onednn else "XLA"
    assert f"cpu device(s) ({isa}, {kernels} kernels) in 1 process(es)" in proc.stdout
    # What a paired PyTorch reference run (reference_from_jax) records the same of.
    assert len(results["initial_weights_sha256"]) == len(results["first_batch_sha256"]) == 64
    # A step's FLOPs as XLA counts them: at least the forward convolutions' (ResNet-8 pair:
    # stem + 6 3x3 convolutions a network, 2 x H x W x C_in x C_out x 9 an image each).
    assert results["train_flops_per_step"] > 2 * 2 * 28 * 28 * 9 * (1 * 16 + 16 * 16) * 16
    # config.json holds the method's settings as they resolved, not None.
    written = json.loads((workdir / "config.json").read_text())
    assert written["loss"]["tau"] == results["method_settings"]["tau"] is not None
    assert results["xla_flags"].endswith(xla_cpu.FLATTEN_AFTER_FUSION_FLAG)  # set by the CLI
    # The CLI restarted with the default malloc where its tunables take effect, and only there.
    expected = "retain" if process_env.malloc_tunables("retain") else "system"
    assert results["malloc"] == expected == process_env.malloc_choice(results["glibc_tunables"])
    assert 100 < results["peak_rss_mb"] < 24 * 1024  # the CLI's process, in MB
    # The CLI records its own command line; the library reads no sys.argv.
    assert results["command"].startswith("python -m ffcl_jax.main --config=configs/fashion_mnist")


@pytest.mark.slow
def test_cli_shards_the_batch_over_several_devices(fmnist_dir, tmp_path):
    """Also in float64, which the CLI runs with 64-bit JAX turned on (the parity tests' exact
    comparisons use the same compute dtype)."""
    workdir = tmp_path / "two_devices"
    proc = run_smoke_cli(
        fmnist_dir,
        workdir,
        "--config.eval_batch_size=20",
        "--config.compute_dtype=float64",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 cpu device(s)" in proc.stdout
    assert "float64 compute |" in proc.stdout
    results = json.loads((workdir / "results.json").read_text())
    # 70 test examples in padded batches of 20 split over 2 devices: each counted once.
    assert all(0 <= s["last"] <= 1 for s in results["summary"].values())
    assert len(results["history"]) == 2
    assert results["onednn_kernels"] is False  # several devices (and float64): XLA's kernels


@pytest.mark.slow
def test_the_smoke_config_runs_unchanged_on_8_devices(fmnist_dir, tmp_path):
    """Its eval batch of 250 does not divide by 8: it is rounded up to 256 (padding masked)."""
    workdir = tmp_path / "eight_devices"
    proc = run_smoke_cli(fmnist_dir, workdir, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 cpu device(s)" in proc.stdout
    results = json.loads((workdir / "results.json").read_text())
    assert results["config"]["eval_batch_size"] == 250 and len(results["history"]) == 2
    # Top-1 over 70 images: every image counted once, none of the 186 padding rows.
    assert all(round(70 * s["last"], 6).is_integer() for s in results["summary"].values())


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.teacher=resnet9"], "error: unknown model 'resnet9'; valid models: resnet110"),
        (["--config.idx_dir=/nonexistent"], "apt-get install dataset-fashion-mnist"),
        (["--config.loss.lam_fuze=1"], 'Did you mean "lam_fuse"'),
        (["--config.cpu_kernels=xla"], "--config.cpu_kernels is now --config.cpu.kernels"),
        (
            ["--config.cpu.batch_norm_backward=autodiff"],
            "--config.cpu.batch_norm_backward is now --config.batch_norm_backward",
        ),
        (["--config.batch_size=abc"], "error: bad command line or config"),
    ],
)
def test_cli_bad_input_is_one_error_line(tmp_path, args, message):
    proc = run_cli("--config=configs/fashion_mnist.py:smoke", *args, f"--workdir={tmp_path / 'w'}")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert message in lines[-1]
    assert "Traceback" not in proc.stderr


def test_progress_line_without_a_timed_step_shows_no_speed(tmp_path, capsys):
    """A log right after the compiling first step (preempted at step 1) has timed no step: no
    speed and no ETA instead of 0 img/s and an absurd ETA."""
    log = report.RunLog(str(tmp_path), True, num_epochs=3, total_steps=100)
    summary = {"loss": 2.5, "train_acc_teacher": 0.1, "train_acc_student": 0.2}
    log.train(1, 1, summary, None, None)
    log.train(10, 1, summary, 640.0, 90 * 32 / 640.0)
    log.close()
    lines = capsys.readouterr().out.strip().splitlines()[-2:]
    assert lines[0].endswith("train acc T 0.100 S 0.200 | speed not measured yet"), lines[0]
    assert lines[1].endswith("| 640 img/s | ETA 0m04s"), lines[1]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["img_per_sec"] for r in rows] == [None, 640.0]


@pytest.mark.slow
def test_a_validation_split_is_evaluated_every_epoch_and_the_test_split_once(fmnist_dir, tmp_path):
    """Epochs are evaluated on the held-out images (and the best checkpoint chosen there); with
    `final_test` the test split is evaluated once, after training, and reported apart."""
    workdir = str(tmp_path / "run")
    config = tiny_config(fmnist_dir, num_epochs=2, validation_size=40, final_test=True)
    results = train.train_and_evaluate(config, workdir)
    assert results["eval_split"] == "validation"
    assert [(r["epoch"], r["split"]) for r in results["history"]] == [
        (1, "validation"),
        (2, "validation"),
    ]
    final = results["final_test"]
    assert final["split"] == "test" and final["epoch"] == 2
    assert set(final) >= {"student", "teacher", "fused", "ensemble"}
    best = results["best_checkpoint"]
    assert best["value"] == max(r["student"] for r in results["history"])
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [(r["split"], r["epoch"]) for r in rows if r["kind"] == "eval"]
    assert evals == [("validation", 1), ("validation", 2), ("test", 2)]
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["tensors"]) | set(events.Tags()["scalars"])
    assert {"validation/acc_student", "test/acc_student"} <= tags
    # 256 training images less 40 held out: 216 // 32 = 6 steps an epoch.
    assert results["history"][-1]["step"] == 12


@pytest.mark.slow
def test_a_run_with_a_validation_split_leaves_the_test_split_alone_unless_asked(
    fmnist_dir, tmp_path
):
    """Without `final_test` nothing of the test split is evaluated, logged or reported: a run
    that chooses settings on validation cannot see it."""
    workdir = tmp_path / "run"
    config = tiny_config(fmnist_dir, num_epochs=1, validation_size=40)
    results = train.train_and_evaluate(config, str(workdir))
    assert results["final_test"] is None
    assert {r["split"] for r in results["history"]} == {"validation"}
    assert '"test"' not in (workdir / "metrics.jsonl").read_text()


@pytest.mark.slow
def test_fused_feature_forms_train_end_to_end(fmnist_dir):
    """A few steps of each fused feature form lower the loss; the feature term and the stage
    classifiers' cross-entropy are logged."""
    for form, extra in (("fused_map", set()), ("stage_fusion", {"ce_stage_fused"})):
        config = tiny_config(fmnist_dir)
        config.loss.feat_form = form
        setup, state = build(config)
        assert "fused_knowledge" in state.params
        step = jax.jit(setup.train_step)
        batch = fixed_batch(fmnist_dir)
        first = None
        for _ in range(4):
            state, metrics = step(state, batch)
            first = first if first is not None else float(metrics["loss"])
        assert {"feat"} | extra <= set(metrics)
        assert np.isfinite(float(metrics["feat"]))
        assert float(metrics["loss"]) < first
