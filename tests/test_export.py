"""Export of trained networks, safe loading of files, and the KD preset from a frozen teacher."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from ffcl_jax import datasets, export, train
from ffcl_jax.errors import UserError
from tests.conftest import REPO, tiny_config


@pytest.fixture(scope="module")
def independent_run(fmnist_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("independent") / "run"
    config = tiny_config(fmnist_dir, method="independent", train_examples=128)
    results = train.train_and_evaluate(config, str(workdir))
    return workdir, results


def test_exported_networks_predict_as_in_the_run(independent_run, fmnist_dir, tmp_path):
    workdir, results = independent_run
    path = export.export_run(str(workdir), str(tmp_path / "nets.npz"), ("student", "teacher"))
    images, labels = datasets.load_idx_split(fmnist_dir, "test")
    for role in ("student", "teacher"):
        model, predict, meta = export.load_exported(path, role)
        accuracy = float(np.mean(np.argmax(np.asarray(predict(images)), -1) == labels))
        assert accuracy == pytest.approx(results["history"][-1][role], abs=1e-9)
        assert meta["roles"][role] == "resnet8" and meta["step"] == 8
    assert meta["config"]["method"] == "independent"


@pytest.mark.slow
def test_export_cli_and_missing_roles(independent_run, tmp_path):
    workdir, _ = independent_run
    output = tmp_path / "student.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "ffcl_jax.export", f"--workdir={workdir}", f"--output={output}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"wrote student to {output}" in proc.stdout
    with pytest.raises(UserError, match="holds student, not the teacher; export it with --members"):
        export.load_exported(str(output), "teacher")
    with pytest.raises(UserError, match="no checkpoint step 3"):
        export.export_run(str(workdir), str(tmp_path / "x.npz"), step=3)


class _RunsCode:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["pickle", "npy_object", "npz_object", "garbage"])
def test_crafted_files_are_refused_without_running_code(tmp_path, kind, fmnist_dir):
    marker = tmp_path / "code_ran"
    path = tmp_path / "crafted.npz"
    payload = {"student/params/x": np.array([_RunsCode(str(marker))], dtype=object)}
    if kind == "pickle":
        path.write_bytes(pickle.dumps(_RunsCode(str(marker))))
    elif kind == "npy_object":
        with open(path, "wb") as f:
            np.save(f, payload["student/params/x"], allow_pickle=True)
    elif kind == "npz_object":
        np.savez(path, **payload)
    else:
        path.write_bytes(b"PK\x03\x04 not really a zip")
    assert not marker.exists()
    with pytest.raises(UserError, match="is not an ffcl_jax export"):
        export.read_export(str(path))
    # The same file given to KD as a teacher is refused the same way.
    config = tiny_config(fmnist_dir, method="kd", teacher_checkpoint=str(path))
    with pytest.raises(UserError, match="is not an ffcl_jax export"):
        train.train_and_evaluate(config, str(tmp_path / "kd"))
    assert not marker.exists()


@pytest.mark.slow
def test_kd_trains_the_student_from_a_frozen_teacher(independent_run, fmnist_dir, tmp_path):
    teacher_dir, teacher_results = independent_run
    config = tiny_config(
        fmnist_dir, method="kd", teacher_checkpoint=str(teacher_dir), train_examples=128
    )
    results = train.train_and_evaluate(config, str(tmp_path / "kd"))
    assert results["loss_terms"] == ["ce_student", "kl_teacher_to_student"]
    source = export.flatten(_final(teacher_dir))
    trained = export.flatten(_final(tmp_path / "kd"))
    for key in source:
        if key.startswith(("params/teacher", "batch_stats/teacher")):
            np.testing.assert_array_equal(trained[key], source[key], err_msg=key)
    moved = [
        k
        for k in source
        if k.startswith("params/student") and not np.array_equal(trained[k], source[k])
    ]
    assert moved, "the student did not train"
    # The frozen teacher evaluates exactly as at the end of its own run, at every epoch.
    assert [row["teacher"] for row in results["history"]] == [
        teacher_results["history"][-1]["teacher"]
    ] * len(results["history"])


def test_kd_refuses_a_teacher_of_another_model(independent_run, fmnist_dir, tmp_path):
    teacher_dir, _ = independent_run
    config = tiny_config(
        fmnist_dir, method="kd", teacher="resnet14", teacher_checkpoint=str(teacher_dir)
    )
    with pytest.raises(UserError, match="holds a teacher 'resnet8' trained on 'fashion_mnist'"):
        train.train_and_evaluate(config, str(tmp_path / "kd"))
    config = tiny_config(fmnist_dir, method="kd", teacher_checkpoint=str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="holds no checkpoints/ folder"):
        train.train_and_evaluate(config, str(tmp_path / "kd2"))


def _final(workdir):
    from ffcl_jax import checkpoint

    checkpoints, step = checkpoint.open_finished_run(str(workdir), tiny_config("."))
    with checkpoints:
        return checkpoints.restore_raw_state(step)


OUTSIDE_THE_SOURCE_TREE = """
import sys
sys.path.insert(0, sys.argv[1])  # the installed copy, first
import numpy as np
import torch
import ffcl_jax
from ffcl_jax import convert, datasets, export

assert ffcl_jax.__file__.startswith(sys.argv[1]), ffcl_jax.__file__
model = convert.torch_model_from_export(sys.argv[2])
images, labels = datasets.load_idx_split(sys.argv[3], "test")
meta = export.read_export(sys.argv[2]).meta
norm = meta["normalization"]
x = (images.astype(np.float32) - np.float32(norm["mean"][0] * norm["scale"])) / np.float32(
    norm["std"][0] * norm["scale"]
)
with torch.no_grad():
    logits, _ = model(torch.from_numpy(x).permute(0, 3, 1, 2))  # and the stage maps
print("accuracy", float((logits.argmax(-1).numpy() == labels).mean()))
"""


@pytest.mark.slow
def test_an_installed_package_loads_the_exported_student_into_pytorch(
    independent_run, fmnist_dir, tmp_path
):
    """`pip install .[torch]` (here without dependencies, into a folder) gives `ffcl_jax.convert`
    and the reference models; from outside the source tree, an exported student runs in PyTorch
    with the run's own accuracy."""
    pytest.importorskip("torch")
    workdir, results = independent_run
    path = export.export_run(str(workdir), str(tmp_path / "student.npz"))
    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            REPO,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    assert (site / "ffcl_jax" / "torch_reference" / "models.py").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", OUTSIDE_THE_SOURCE_TREE, str(site), path, fmnist_dir],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    accuracy = float(proc.stdout.split("accuracy")[-1])
    assert accuracy == pytest.approx(results["history"][-1]["student"], abs=2 / 70)
