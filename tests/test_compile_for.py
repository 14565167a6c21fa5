"""`ffcl_jax.compile_for`: the trainer's steps compiled for a TPU slice by libtpu, on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import pytest

from ffcl_jax import compile_for, cpu_kernels, parallel, train, xla_cpu
from ffcl_jax.errors import UserError
from tests.conftest import REPO, tiny_config
from tests.helpers.cli import run_python

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed: pip install -e '.[tpu]' (FFCL_SETUP_TPU=1 scripts/setup.sh)",
)


SCAN_REPORT = "experiments/results/compile_for_cifar100_tpu_scan_v5e_2x2.json"


def _compile_for(*args: str, timeout: int = 900):
    return run_python("-m", "ffcl_jax.compile_for", *args, timeout=timeout)


def test_the_roofline_bound_is_the_slower_of_compute_and_hbm_traffic():
    chip = compile_for.Chip("x", 4e12, 16 * 2**30, 2e9, "nowhere")
    flops, traffic = 3 * chip.bf16_flops_per_second, 0.5 * chip.hbm_bytes_per_second
    bound = compile_for.roofline(flops, traffic, chip)
    assert bound["compute_bound_seconds"] == pytest.approx(3.0)
    assert bound["memory_bound_seconds"] == pytest.approx(0.5)
    assert bound["step_bound_seconds"] == pytest.approx(3.0)
    assert bound["limited_by"] == "compute"
    bound = compile_for.roofline(flops / 30, traffic * 4, chip)
    assert bound["step_bound_seconds"] == pytest.approx(2.0)
    assert bound["limited_by"] == "HBM bandwidth"


def test_every_chip_figure_names_its_source():
    for kind, chip in compile_for.CHIPS.items():
        assert chip.source.startswith("https://cloud.google.com/tpu/docs/"), kind
        assert chip.name in chip.source
        # Orders of magnitude any TPU since v4 has: catches a unit slip (GB for GiB is not one).
        assert 1e14 < chip.bf16_flops_per_second < 1e16
        assert 1e10 < chip.hbm_bytes < 1e12
        assert 1e11 < chip.hbm_bytes_per_second < 1e13


def test_collectives_are_counted_with_their_bytes():
    hlo = """
ENTRY %main {
  %all-reduce.1 = (f32[16]{0:T(128)S(1)}, bf16[8,4]{1,0}) all-reduce(%a, %b), channel_id=2
  %all-reduce-start.2 = f32[100]{0} all-reduce-start(%c), channel_id=3
  %all-reduce-done.2 = f32[100]{0} all-reduce-done(%all-reduce-start.2)
  ROOT %all-gather.3 = u8[4,2]{1,0} all-gather(%d), dimensions={0}
  %fusion.4 = f32[2]{0} fusion(%all-reduce.1), calls=%all-reduce-like_fusion
}
"""
    found = compile_for.collectives(hlo)
    assert found == {
        "all-reduce": {"count": 2, "bytes": 16 * 4 + 8 * 4 * 2 + 100 * 4},
        "all-gather": {"count": 1, "bytes": 8},
    }
    assert compile_for.shape_bytes("pred[3]{0}") == 3
    assert compile_for.shape_bytes("s32[]") == 4


def test_loops_are_counted_and_the_report_says_what_they_hide():
    """A scanned step's loops: counted in the optimised HLO, and the terminal report says that
    XLA's cost analysis counts each body once (the committed :tpu report with scan_blocks)."""

    def body(carry, _):
        return carry * 2.0, None

    looped = jax.jit(lambda x: jax.lax.scan(body, x, None, length=7)[0])
    assert compile_for.while_loops(looped.lower(1.0).compile().as_text()) == 1
    assert compile_for.while_loops(jax.jit(lambda x: x * 2.0).lower(1.0).compile().as_text()) == 0
    with open(os.path.join(REPO, SCAN_REPORT)) as f:
        report = json.load(f)
    assert report["scan_blocks"] and report["train_step"]["while_loops"] > 0
    lines = compile_for.format_report(report).splitlines()
    assert sum("counts each loop body once" in line for line in lines) == 2  # train and eval


def test_the_platform_of_the_mesh_decides_the_backend_specific_choices(fmnist_dir):
    """A step built over a TPU slice's devices gets no XLA:CPU options and none of the oneDNN
    kernels, whatever JAX's default backend (here the CPU); a deep network's BatchNorm takes the
    closed-form backward on a TPU as on the CPU, not on a GPU (where it was not measured)."""
    deep = tiny_config(fmnist_dir, teacher="resnet56", **{"cpu.kernels": "auto"})
    assert jax.default_backend() == "cpu"
    assert xla_cpu.compiler_options(deep, "cpu") == xla_cpu.compiler_options(deep)
    assert xla_cpu.compiler_options(deep, "tpu") is None
    assert xla_cpu.closed_form_batch_norm(deep, "cpu")
    assert xla_cpu.closed_form_batch_norm(deep, "tpu")
    assert not xla_cpu.closed_form_batch_norm(deep, "gpu")
    assert not xla_cpu.use_onednn_kernels(deep, 1, "tpu")
    deep.cpu.kernels = "onednn"
    with pytest.raises(UserError, match="runs on the CPU only, this is tpu"):
        xla_cpu.use_onednn_kernels(deep, 1, "tpu")

    config = tiny_config(fmnist_dir, **{"cpu.kernels": "auto"})
    mesh = parallel.DataParallel(1, devices=jax.devices()[:1])
    assert mesh.platform == "cpu" and mesh.size == 1
    cpu_setup, _ = train.build(config, train.check_config(config, 1), 10, mesh)
    assert cpu_setup.platform == "cpu"
    assert cpu_setup.onednn_kernels == xla_cpu.use_onednn_kernels(config, 1, "cpu")
    mesh.platform = "tpu"  # what a mesh over compile-only TPU devices says
    tpu_setup, state = train.build(config, train.check_config(config, 1), 10, mesh)
    assert tpu_setup.platform == "tpu" and not tpu_setup.onednn_kernels
    train_step, _ = train.jit_steps(tpu_setup, config)
    batch = {
        "image": jax.ShapeDtypeStruct((config.batch_size, 28, 28, 1), "uint8"),
        "label": jax.ShapeDtypeStruct((config.batch_size,), "int32"),
    }
    text = train_step.trace(state, batch).lower().as_text()
    assert not [target for target in cpu_kernels.TARGETS if target in text]


def test_a_device_list_makes_the_mesh():
    devices = jax.devices()
    mesh = parallel.DataParallel(devices=devices[:1])
    assert list(mesh.mesh.devices.flat) == devices[:1]
    with pytest.raises(UserError, match="2 devices asked for, 1 available"):
        parallel.DataParallel(2, devices=devices[:1])


@pytest.mark.slow
def test_the_command_needs_a_topology():
    proc = _compile_for("--config=configs/cifar100.py:smoke")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --config and --topology")


@needs_libtpu
@pytest.mark.parametrize(
    "args,message",
    [
        (["--topology=v5e:3x3"], "error: unknown TPU topology 'v5e:3x3'"),
        (["--topology=v9:2x2"], "error: unknown TPU topology 'v9:2x2'"),
        (
            ["--topology=v5e:2x2", "--config.batch_size=66"],
            "error: config.batch_size=66 must be a positive multiple of the 4 devices",
        ),
        (["--topology=v5e:2x2", "--config.compute_dtype=float64"], "error: TPUs have no float64"),
    ],
)
def test_bad_input_is_one_error_line(args, message):
    proc = _compile_for("--config=configs/cifar100.py:smoke", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@needs_libtpu
def test_the_smoke_step_compiles_for_a_v5e_slice(tmp_path):
    """The real TPU compiler builds the smoke config's train and eval steps for a 2x2 v5e slice
    (4 chips) on this CPU: the batch is split over the chips, the state replicated, BatchNorm's
    global statistics and the gradient summed by all-reduces, and the report says so."""
    output = tmp_path / "report.json"
    proc = _compile_for(
        "--config=configs/cifar100.py:smoke", "--topology=v5e:2x2", f"--output={output}"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["host_backend"] == "cpu"  # nothing ran on a TPU
    assert report["chips"] == 4 and report["chip"]["name"] == "v5e"
    assert "not measurements" in report["times_are"] and "lower bound" in proc.stdout
    for name, global_batch in (("train_step", 64), ("eval_step", report["eval_global_batch"])):
        step = report[name]
        assert step["per_chip_batch"]["image"] == [global_batch // 4, 32, 32, 3], name
        assert step["state_replicated"], name
        assert step["flops"] > 0 and step["bytes_accessed"] > 0, name
        memory = step["memory_bytes"]
        assert memory["arguments"] > 0 and memory["generated_code"] > 0, name
        assert 0 < memory["fraction_of_hbm"] < 1, name
        assert step["collectives"]["all-reduce"]["count"] >= 1, name
        assert step["float64_ops"] == step["host_callbacks"] == step["cpu_kernel_calls"] == 0
        # The compile's CPU time beside its wall time, and how loaded the machine was.
        assert step["compile_cpu_seconds"] > 0 and step["host_load_average"] >= 0, name
    # 16 images a chip: one warning line, before the steps' figures.
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == report["warnings"] and len(warnings) == 1
    assert warnings[0].startswith("warning: 16 images a chip (batch_size 64 over 4 chips)")
    fixed = report["fixed_bytes"]
    assert fixed["weights"] == report["parameter_bytes"]
    assert fixed["optimizer_state"] >= fixed["weights"]  # a momentum trace per parameter
    assert "fixed per chip, whatever the batch" in proc.stdout
    train_step = report["train_step"]
    # The gradient of every (float32) parameter is summed over the chips.
    assert train_step["collectives"]["all-reduce"]["bytes"] >= report["parameter_bytes"] > 0
    bound = train_step["roofline"]["step_bound_seconds"]
    assert report["epoch_bound_seconds"]["train"] == pytest.approx(
        report["steps_per_epoch"] * bound
    )


@pytest.mark.slow
@needs_libtpu
def test_pcl_compiles_with_a_view_per_branch_and_its_temporal_mean(tmp_path):
    """PCL's step takes a batch of three views and carries the temporal mean: the TPU compiler
    builds it, splitting the views' batch over the chips, and the eval step reads the mean."""
    output = tmp_path / "report.json"
    proc = _compile_for(
        "--config=configs/cifar100.py:smoke",
        "--config.method=pcl",
        "--topology=v5e:2x2",
        f"--output={output}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["train_step"]["per_chip_batch"]["image"] == [16, 3, 32, 32, 3]
    assert report["eval_step"]["per_chip_batch"]["image"][1:] == [32, 32, 3]
    for name in ("train_step", "eval_step"):
        assert report[name]["state_replicated"], name
    # The temporal mean doubles the replicated weights the eval step reads.
    assert report["eval_step"]["memory_bytes"]["arguments"] > 2 * report["parameter_bytes"]
