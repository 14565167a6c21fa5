"""Runs on a Cloud Storage workdir, against a real GCS JSON API: a local emulator on 127.0.0.1.

The emulator (`gcp-storage-emulator`, installed with the test extras; tests/helpers/
gcs_emulator.py adds the one header it lacks) is started and stopped here. Each library is
pointed at it the way it supports:
- etils.epath (workdir files, exports, `--fresh`) through fsspec's gcsfs: `EPATH_USE_TF=false`
  and `STORAGE_EMULATOR_HOST`;
- orbax's checkpoint arrays through tensorstore: `TENSORSTORE_GCS_HTTP_URL` and
  `GOOGLE_AUTH_TOKEN_FOR_TESTING`.
TensorFlow's own GCS client (TensorBoard events through `tf.summary`, TFDS data on gs://) has
its endpoints compiled in and cannot be pointed at an emulator: these runs send their events to
a local `--config.tensorboard_dir`, and the last test covers that writer on TensorFlow's
in-memory file system instead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from etils import epath

from tests.conftest import REPO, tiny_config
from tests.helpers.checkpoint_runs import (
    CLI_ARGS,
    EPOCHS,
    PREEMPT_IN_EPOCH_3,
    STEPS_PER_EPOCH,
    assert_same_state,
)
from tests.helpers.checkpoint_runs import run as run_with_env
from tests.helpers.ports import free_port

BUCKET = "ffcl-test"


@pytest.fixture(scope="module")
def gcs():
    """The emulator's environment (also set in this process while the module's tests run)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "tests/helpers/gcs_emulator.py", str(port), BUCKET],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            break
        except OSError:
            time.sleep(0.1)
    else:
        server.kill()
        pytest.fail("the GCS emulator did not start")
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "EPATH_USE_TF": "false",
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    }
    # etils.epath decides once per process whether TensorFlow serves gs:// (a cached check of
    # EPATH_USE_TF); an earlier test in this worker may have made it.
    from etils.epath import gpath

    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        gpath._is_tf_installed.cache_clear()
        yield env
    gpath._is_tf_installed.cache_clear()
    server.kill()
    server.wait()


def run(gcs, *args, entry=("-m", "ffcl_jax.main")) -> subprocess.CompletedProcess:
    return run_with_env(*args, entry=entry, env=gcs)


def listing(top: str) -> set[str]:
    """Every file under `top` (local or gs://), relative to it."""
    from ffcl_jax import storage

    storage.forget_cached_listings(top)  # the runs wrote from other processes
    root = epath.Path(top)
    key = os.fspath(root).split("://", 1)[-1].strip("/")  # gcsfs walks without the scheme
    names = set()
    for folder, _, files in root.walk():
        base = os.fspath(folder).split("://", 1)[-1].strip("/")
        assert base.startswith(key), (base, key)
        names.update(os.path.join(base[len(key) :].strip("/"), name) for name in files)
    return names


def final_state(workdir: str) -> tuple[int, dict]:
    from ffcl_jax import checkpoint, export

    checkpoints, step = checkpoint.open_finished_run(workdir, tiny_config("."))
    with checkpoints:
        return step, export.flatten(checkpoints.restore_raw_state(step))


def eval_rows(workdir: str) -> list[dict]:
    from ffcl_jax import report

    rows = report.read_jsonl(f"{workdir}/metrics.jsonl")
    return [{k: v for k, v in r.items() if k != "img_per_sec"} for r in rows if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def gs_run(gcs, fmnist_dir, tmp_path_factory):
    """The test_checkpoint run, uninterrupted, on gs://; events in a local folder."""
    workdir = f"gs://{BUCKET}/straight"
    events = tmp_path_factory.mktemp("events")
    proc = run(
        gcs,
        *CLI_ARGS,
        f"--config.idx_dir={fmnist_dir}",
        f"--config.tensorboard_dir={events}",
        f"--workdir={workdir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, events, proc


@pytest.mark.slow
def test_a_run_on_a_gs_workdir_writes_every_output_there(gs_run):
    workdir, events, proc = gs_run
    files = listing(workdir)
    for name in ("config.json", "metrics.jsonl", "results.json", "curves.png"):
        assert name in files
    steps = {name.split("/")[1] for name in files if name.startswith("checkpoints/")}
    assert str(EPOCHS * STEPS_PER_EPOCH) in steps
    assert not os.path.exists(os.path.join(REPO, "gs:"))  # no local look-alike folder
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(events))
    results = json.loads(epath.Path(f"{workdir}/results.json").read_text())
    assert results["history"][-1]["step"] == EPOCHS * STEPS_PER_EPOCH
    assert f"outputs in {workdir}" in proc.stdout
    png = epath.Path(f"{workdir}/curves.png").read_bytes()
    assert png.startswith(b"\x89PNG")


@pytest.mark.slow
def test_sigterm_mid_epoch_then_rerun_resumes_from_gs_exactly(gcs, gs_run, fmnist_dir, tmp_path):
    straight, _, _ = gs_run
    workdir = f"gs://{BUCKET}/preempted"
    args = [
        *CLI_ARGS,
        f"--config.idx_dir={fmnist_dir}",
        f"--config.tensorboard_dir={tmp_path}",
        f"--workdir={workdir}",
    ]
    proc = run(gcs, *args, entry=("-c", PREEMPT_IN_EPOCH_3))
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert f"checkpoint step 10 is in {workdir}/checkpoints" in proc.stderr
    proc = run(gcs, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from checkpoint step 10 (epoch 2, batch 2)" in proc.stdout
    step, resumed = final_state(workdir)
    assert step == final_state(straight)[0]
    assert_same_state(resumed, final_state(straight)[1])
    assert eval_rows(workdir) == eval_rows(straight)


@pytest.mark.slow
def test_fresh_on_gs_moves_the_earlier_run_and_deletes_nothing(gcs, fmnist_dir, tmp_path):
    workdir = f"gs://{BUCKET}/fresh"
    args = [
        *CLI_ARGS,
        f"--config.idx_dir={fmnist_dir}",
        f"--config.tensorboard_dir={tmp_path}",
        "--config.num_epochs=1",
        f"--workdir={workdir}",
    ]
    assert run(gcs, *args).returncode == 0
    before = listing(workdir)
    proc = run(gcs, *args, "--fresh")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = listing(workdir)
    (stamp,) = {name.split("/")[1] for name in after if name.startswith("previous_runs/")}
    moved = {name.split("/", 2)[2] for name in after if name.startswith("previous_runs/")}
    assert moved == before | {"moved.txt"}  # every file of the first run, and a note
    assert f"moved the earlier run to {workdir}/previous_runs/{stamp}" in proc.stdout
    assert "results.json" in after


@pytest.mark.slow
def test_export_and_load_exported_on_gs_reproduce_the_runs_accuracy(gcs, gs_run, fmnist_dir):
    from ffcl_jax import datasets, export

    workdir, _, _ = gs_run
    output = f"gs://{BUCKET}/exports/student.npz"
    proc = run(gcs, f"--workdir={workdir}", f"--output={output}", entry=("-m", "ffcl_jax.export"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote student to {output}" in proc.stdout
    _, predict, meta = export.load_exported(output)
    images, labels = datasets.load_idx_split(fmnist_dir, "test")
    images, labels = images[:70, ..., None], labels[:70]  # CLI_ARGS: test_examples=70
    accuracy = float(np.mean(np.argmax(np.asarray(predict(images)), -1) == labels))
    assert accuracy == pytest.approx(meta["test_top1"]["student"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "gs"])
def test_a_run_killed_before_its_first_checkpoint_restarts_with_the_same_command(
    gcs, fmnist_dir, tmp_path, where
):
    """A scheduler's restart loop: SIGKILL before the first save, then the same command."""
    workdir = f"gs://{BUCKET}/restart" if where == "gs" else str(tmp_path / "restart")
    args = [
        *CLI_ARGS,
        f"--config.idx_dir={fmnist_dir}",
        f"--config.tensorboard_dir={tmp_path / 'events'}",
        "--config.num_epochs=1",
        f"--workdir={workdir}",
    ]
    killer = ("tests/helpers/kill_at_checkpoint.py", str(STEPS_PER_EPOCH), "before")
    proc = run(gcs, *args, entry=killer)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    partial = listing(workdir)
    assert "metrics.jsonl" in partial and not any(n.startswith("checkpoints/") for n in partial)
    proc = run(gcs, *args, "--config.learning_rate=0.05")
    assert proc.returncode == 2 and "learning_rate=0.1 then but 0.05 now" in proc.stderr
    assert listing(workdir) == partial  # refused: nothing touched
    proc = run(gcs, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "moved the earlier run to" in proc.stdout
    after = listing(workdir)
    moved = {n.split("/", 2)[2] for n in after if n.startswith("previous_runs/")}
    assert moved == partial | {"moved.txt"}
    assert "results.json" in after


@pytest.mark.slow
def test_bad_gs_input_ends_in_one_line_naming_the_path(gcs, gs_run, fmnist_dir, tmp_path):
    base = [*CLI_ARGS, f"--config.idx_dir={fmnist_dir}", f"--config.tensorboard_dir={tmp_path}"]

    def error_line(*args) -> str:
        proc = run(gcs, *base, *args)
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ")
        return last

    line = error_line("--workdir=gs://no-such-bucket/run")
    assert "bucket gs://no-such-bucket of --workdir=gs://no-such-bucket/run does not exist" in line
    garbage = epath.Path(f"gs://{BUCKET}/garbage/teacher.npz")
    garbage.write_bytes(b"not an export")
    kd = ["--config.method=kd", f"--workdir=gs://{BUCKET}/kd"]
    line = error_line(*kd, f"--config.teacher_checkpoint={garbage}")
    assert f"{garbage} is not an ffcl_jax export" in line
    assert garbage.read_bytes() == b"not an export"  # left as it was
    line = error_line(*kd, f"--config.teacher_checkpoint=gs://{BUCKET}/garbage")
    assert f"'gs://{BUCKET}/garbage' holds no checkpoints/ folder" in line
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me")
    line = error_line(f"--workdir={blocker}/run")
    assert f"cannot write to --workdir={blocker}/run" in line
    assert blocker.read_text() == "keep me"


@pytest.mark.slow
def test_two_processes_share_one_gs_workdir(gcs, fmnist_dir, tmp_path):
    """Two jax.distributed processes on one gs:// workdir: same parameters, one set of files."""
    from ffcl_jax import report

    port, workdir = free_port(), f"gs://{BUCKET}/two_processes"
    env = dict(
        os.environ,
        **gcs,
        TF_CPP_MIN_LOG_LEVEL="3",
        PYTHONPATH=REPO,
        FFCL_TEST_TENSORBOARD_DIR=str(tmp_path / "events"),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "tests/helpers/multiprocess_run.py", str(i), "2", str(port), "2"]
            + [fmnist_dir, workdir, str(tmp_path / f"p{i}.npz"), "3"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
    p0, p1 = (np.load(tmp_path / f"p{i}.npz") for i in range(2))
    for key in p0.files:
        np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
    files = listing(workdir)
    assert {"config.json", "metrics.jsonl", "results.json"} <= files
    assert not any(name.startswith(".write_check") for name in files)
    evals = [r for r in report.read_jsonl(f"{workdir}/metrics.jsonl") if r["kind"] == "eval"]
    assert len(evals) == 1  # written by process 0 only


def test_tensorboard_events_go_through_tensorflows_file_system_layer(tmp_path):
    """TensorFlow's GCS client cannot be pointed at the emulator; the events writer is checked
    on TensorFlow's in-memory file system, a non-local path served by the same layer."""
    tf = pytest.importorskip("tensorflow")
    from ffcl_jax import report

    log = report.RunLog(tmp_path, True, 1, 1, tensorboard_dir="ram://ffcl_events")
    log.writer.write_scalars(1, {"train/loss": 1.5})
    log.close()
    (events,) = tf.io.gfile.glob("ram://ffcl_events/events.out.tfevents*")
    assert tf.io.gfile.stat(events).length > 0
    assert not os.path.exists(tmp_path / "tensorboard")


@pytest.mark.slow
def test_the_study_drivers_read_and_copy_runs_under_a_gs_root(gcs, tmp_path):
    """`experiments/study.py --workdirs=gs://...` (every plan, through `study_runs`): finished
    runs are found there and their files copied to the local results folder."""
    sys.path.insert(0, os.path.join(REPO, "experiments"))
    import study
    import study_runs

    workdirs = f"gs://{BUCKET}/table"
    plan = study_runs.load(os.path.join(REPO, "experiments", "plans", "powered_2026_12.py"))
    args = study.parse_args([f"--workdirs={workdirs}", f"--repo={tmp_path}", "--seeds=0"])
    pargs = study.phase_args(plan, plan.final, args)
    rows = study.rows_of(plan.final, study.phase_seeds(plan, plan.final, args))
    run = next(r for r, _ in rows if (r.name, r.framework) == ("independent", "jax"))
    workdir = study_runs.run_workdir(run, 0, pargs)
    assert os.fspath(workdir) == f"{workdirs}/powered_study/{study_runs.run_id(run, 0)}"
    assert study_runs.finished(run, 0, pargs) is None
    (workdir / "results.json").write_text(json.dumps({"summary": {"student": {"last": 0.5}}}))
    (workdir / "metrics.jsonl").write_text('{"kind": "eval"}\n')
    assert study_runs.finished(run, 0, pargs)["summary"]["student"]["last"] == 0.5
    study_runs.keep_copy(run, 0, pargs)
    results = tmp_path / "experiments" / "results"
    copy = results / "fashion_mnist_powered_runs" / study_runs.run_id(run, 0)
    assert (copy / "metrics.jsonl").read_text() == '{"kind": "eval"}\n'
    assert json.loads((copy / "results.json").read_text())["summary"]["student"]["last"] == 0.5
