"""The experiment scripts: the JAX/PyTorch benchmarks, the study driver, its plans and run loop."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

pytest.importorskip("torch")

import bench_results  # noqa: E402
import study  # noqa: E402
import study_report  # noqa: E402
import study_runs  # noqa: E402
import study_sensitivity  # noqa: E402
import study_stats  # noqa: E402

PLANS = os.path.join(ROOT, "experiments", "plans")


def plan_module(name: str):
    """The plan module experiments/plans/<name>.py (its grid, rows and sections)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"plan_{name}", os.path.join(PLANS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = [
    "--config=configs/fashion_mnist.py",
    "--config.teacher=resnet8",
    "--config.student=resnet8",
    "--config.batch_size=32",
]


def run_script(name: str, *args: str) -> str:
    """Runs experiments/<name> in a subprocess and returns its stdout (it must succeed)."""
    argv = [sys.executable, os.path.join(ROOT, "experiments", name), *args]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# Installed here but not on the GPU image the device tool lends (KINDS.md's package list).
MISSING_ON_GPU_IMAGE = ("tensorflow", "tensorflow_datasets", "clu")


def without_tensorflow(tmp_path) -> str:
    """A folder that, first on PYTHONPATH, shadows tensorflow, TFDS and clu: importing any of
    them fails, as on the GPU image."""
    blocked = tmp_path / "blocked"
    for name in MISSING_ON_GPU_IMAGE:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} blocked')\n")
    return str(blocked)


@pytest.mark.slow
def test_benchmark_times_both_frameworks_and_fills_the_readme_table(fmnist_dir, tmp_path):
    output = tmp_path / "bench_tiny.json"
    argv = [
        sys.executable,
        "experiments/bench_step.py",
        *TINY,
        f"--config.idx_dir={fmnist_dir}",
        "--modes=step,epoch",
        "--repeats=2",
        "--warmup=1",
        "--epoch_examples=96",
        "--turns=2",
        f"--output={output}",
    ]
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, timeout=900)
    result = json.loads(output.read_text())
    assert len(result["turns"]) == 2  # JAX, PyTorch, JAX, PyTorch
    for mode in ("step", "epoch"):
        turn_ratios = [turn["ratio"][mode] for turn in result["turns"]]
        assert result["ratio"][mode] == pytest.approx(sum(turn_ratios) / 2, abs=1e-3)
    for side in ("jax", "pytorch"):
        step, epoch = result[side]["step"], result[side]["epoch"]
        assert step["repeats"] == 2 and step["step_ms_min"] <= step["step_ms_median"]
        assert step["img_per_sec_median"] == pytest.approx(32 / step["step_ms_median"] * 1000, 0.01)
        assert epoch["steps"] == 3 and epoch["examples"] == 96 and epoch["seconds"] > 0
    jax_side, torch_side = result["jax"]["step"], result["pytorch"]["step"]
    # The sides shown are the turn with the median step ratio: of two, the lower one.
    assert min(turn["ratio"]["step"] for turn in result["turns"]) == pytest.approx(
        jax_side["img_per_sec_median"] / torch_side["img_per_sec_median"], 0.01
    )
    assert jax_side["first_step_seconds_incl_compile"] > 0 and jax_side["xla_temp_mb"] > 0
    # The step's fraction of the machine's float32 peak: XLA's FLOP count over its minimum time,
    # against the faster framework's large matrix product.
    peak = result["fp32_peak"]
    assert peak["gemm_gflops"] == max(result[s]["gemm_gflops"] for s in ("jax", "pytorch")) > 0
    assert jax_side["train_gflop_per_step"] > 0
    assert peak["jax_step_min_fraction"] == pytest.approx(
        jax_side["train_gflop_per_step"] / (jax_side["step_ms_min"] / 1e3) / peak["gemm_gflops"],
        abs=2e-3,
    )
    assert result["machine"]["cores"] == os.cpu_count()
    # "auto" for a shallow pair: only the reductions in YNNPACK.
    assert result["jax"]["compiler_options"] == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"
    }
    # The JAX worker added the process-wide XLA:CPU flag before its backend started.
    assert result["jax"]["xla_flags"].endswith("xla_cpu_flatten_after_fusion")
    # "auto" took the oneDNN convolutions where they are built and measured; both frameworks'
    # workers ran with the default malloc (the benchmark restarted itself with its tunables, as
    # the CLI does).
    from ffcl_jax import cpu_kernels, xla_cpu

    auto_onednn = cpu_kernels.available() and xla_cpu.kernels_measured_here()
    assert result["jax"]["onednn_kernels"] is auto_onednn
    assert result["jax"]["cpu_kernel_ops"] == (list(cpu_kernels.OPS) if auto_onednn else [])
    from ffcl_jax import process_env

    # The workers started with the default malloc, recorded only where its tunables apply.
    expected = "retain" if process_env.malloc_tunables("retain") else "system"
    for tunables in (result["glibc_tunables"], result["jax"]["glibc_tunables"]):
        assert process_env.malloc_choice(tunables) == expected

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold table\n<!-- bench:end -->\noutro\n")
    bench_results.write_readme(str(tmp_path), str(readme))
    text = readme.read_text()
    assert "old table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
    rows = [line for line in text.splitlines() if line.startswith("| resnet8+resnet8")]
    assert len(rows) == 2  # step and epoch
    assert f"**{result['ratio']['step']:.2f}**" in rows[0]
    kernels = (
        ", oneDNN convolutions, BatchNorm+ReLU kernel, residual add+ReLU in it"
        if auto_onednn
        else ""
    )
    malloc = ", malloc keeps freed memory" if expected == "retain" else ""
    assert f"| float32, ynn reduce, flatten after fusion{kernels}{malloc} |" in rows[0]
    m = result["machine"]
    assert f"| {m['cores']}-core {m['cpu']} ({m['isa']}) |" in rows[0]


@pytest.mark.slow
def test_epoch_benchmark_on_synthetic_data_needs_neither_the_data_set_nor_tensorflow(tmp_path):
    """What a GPU node without network runs: no data set on disk, no tensorflow installed."""
    blocked = without_tensorflow(tmp_path)
    output = tmp_path / "bench_synthetic.json"
    argv = [
        sys.executable,
        "experiments/bench_step.py",
        *TINY,
        f"--config.idx_dir={tmp_path / 'missing'}",
        "--config.data_on_device=true",
        "--synthetic_data",
        "--modes=epoch",
        "--epoch_examples=64",
        f"--output={output}",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([blocked, ROOT])}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(output.read_text())
    assert result["epoch_data"] == "synthetic" and result["data_on_device"] is True
    for side in ("jax", "pytorch"):
        assert result[side]["epoch"]["steps"] == 2 and "step" not in result[side]
    assert result["ratio"]["epoch"] > 0

    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:start -->\n<!-- bench:end -->\n")
    bench_results.write_readme(str(tmp_path), str(readme))
    (row,) = [line for line in readme.read_text().splitlines() if "resnet8+resnet8" in line]
    assert "JAX data on device, synthetic images" in row


@pytest.mark.slow
def test_gpu_script_runs_the_benchmark_without_tensorflow_and_returns_the_result(tmp_path):
    """experiments/gpu_bench.sh, as the device machine runs it (no tensorflow, no data set, $OUT
    set), on the CPU with a tiny pair: it must write the result and copy it to $OUT."""
    blocked = without_tensorflow(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [
        "bash",
        "experiments/gpu_bench.sh",
        "bfloat16",
        "--config.teacher=resnet8",
        "--config.student=resnet8",
        "--config.batch_size=32",
        "--modes=epoch",
        "--epoch_examples=64",
        f"--output={tmp_path / 'bench_gpu_tiny.json'}",
    ]
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PYTHONPATH": blocked,
        "OUT": str(out_dir),
    }
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out_dir / "bench_gpu_tiny.json").read_text())
    assert result["compute_dtype"] == "bfloat16" and result["epoch_data"] == "synthetic"
    assert result["pytorch"]["compute"] == "torch.autocast bfloat16"  # like for like
    assert result["data_on_device"] is True and result["ratio"]["epoch"] > 0
    assert "wrote " in (out_dir / "gpu_bench_bfloat16.log").read_text()

    wrong = subprocess.run(
        ["bash", "experiments/gpu_bench.sh", "float16"], cwd=ROOT, capture_output=True, text=True
    )
    assert wrong.returncode == 2 and "float32 or bfloat16" in wrong.stderr


def test_turns_take_the_median_ratio_and_show_that_turn():
    """`--turns`: each turn's JAX/PyTorch ratio; the turn shown is the one with the median ratio
    (the lower of the middle two for an even count)."""

    def sides(jax_rate, torch_rate):
        return {
            "jax": {"step": {"img_per_sec_median": jax_rate}, "epoch": {"img_per_sec": 1.0}},
            "pytorch": {"step": {"img_per_sec_median": torch_rate}, "epoch": {"img_per_sec": 2.0}},
        }

    assert bench_results.pair_ratios(sides(3.0, 2.0), ["step", "epoch"]) == {
        "step": 1.5,
        "epoch": 0.5,
    }
    assert bench_results.pair_ratios({"jax": {}}, ["step"]) == {}
    assert bench_results.median_turn([{"step": 0.5}, {"step": 3.0}, {"step": 2.0}]) == 2
    assert bench_results.median_turn([{"step": 2.0}, {"step": 1.0}]) == 1
    assert bench_results.median_turn([{}]) == 0


def test_benchmark_result_names_keep_settings_apart(monkeypatch):
    """Each setting gets its own results file, so one run never overwrites another's row."""
    from configs.cifar100 import get_config

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    config = get_config()
    assert bench_results.result_name(config, "NVIDIA H100 80GB HBM3", synthetic=False) == (
        "bench_resnet110_resnet32_b128_gpu"
    )
    config.update(compute_dtype="bfloat16", data_on_device=True)
    assert bench_results.result_name(config, "NVIDIA H100 80GB HBM3", synthetic=True) == (
        "bench_resnet110_resnet32_b128_gpu_bfloat16_ondevice_synthetic"
    )
    assert bench_results.result_name(config, "NVIDIA H100 80GB HBM3", False, isa="AVX2") == (
        "bench_resnet110_resnet32_b128_gpu_bfloat16_ondevice"  # the host's ISA is not the GPU's
    )
    config.batch_norm_backward = "autodiff"
    assert bench_results.result_name(config, "1 x cpu", synthetic=False) == (
        "bench_resnet110_resnet32_b128_cpu_bn_autodiff_bfloat16_ondevice"
    )
    # Two CPUs of one model name but another vector ISA run 2x apart: never one file.
    assert bench_results.result_name(config, "1 x cpu", False, isa="AVX-512") == (
        "bench_resnet110_resnet32_b128_cpu_avx512_bn_autodiff_bfloat16_ondevice"
    )
    assert bench_results.result_name(config, "1 x cpu", False, isa="AVX2") == (
        "bench_resnet110_resnet32_b128_cpu_avx2_bn_autodiff_bfloat16_ondevice"
    )
    # The CPU kernels and malloc's choice (the processes' environment) are settings too,
    # malloc's only where its tunables take effect.
    from ffcl_jax import process_env

    config = get_config()
    config.cpu.kernels = "xla"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    monkeypatch.setattr(process_env, "tunable_takes_effect", lambda tunable: True)
    assert bench_results.result_name(config, "1 x cpu", False, isa="AVX2") == (
        "bench_resnet110_resnet32_b128_cpu_avx2_kernels_xla_hugepages"
    )
    monkeypatch.setenv("GLIBC_TUNABLES", ":".join(process_env.MALLOC_TUNABLES["retain"]))
    assert bench_results.result_name(config, "1 x cpu", False, isa="AVX2") == (
        "bench_resnet110_resnet32_b128_cpu_avx2_kernels_xla_retain"
    )
    monkeypatch.setattr(process_env, "tunable_takes_effect", lambda tunable: False)
    assert bench_results.result_name(config, "1 x cpu", False, isa="AVX2") == (
        "bench_resnet110_resnet32_b128_cpu_avx2_kernels_xla"
    )
    assert bench_results.result_name(config, "NVIDIA H100 80GB HBM3", False) == (
        "bench_resnet110_resnet32_b128_gpu_kernels_xla"
    )


def test_machine_description_names_the_vector_isa():
    zen3 = set("fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2 sha_ni vaes".split())
    assert bench_results.cpu_isa(zen3, "x86_64") == "AVX2"
    assert bench_results.cpu_isa(zen3 | {"avx512f", "avx512bw", "avx512vl"}, "x86_64") == "AVX-512"
    assert bench_results.cpu_isa({"fp", "asimd", "sve"}, "aarch64") == "aarch64"
    assert bench_results.cpu_isa(set(), "x86_64") == "x86_64"
    here = bench_results.machine()
    assert here["isa"] and here["cores"] == os.cpu_count()
    if platform.machine() == "x86_64":  # this machine's own /proc/cpuinfo is read
        assert here["isa"] in ("AVX-512", "AVX2", "AVX")
        assert here["vendor"] in ("AMD", "Intel")


@pytest.mark.slow
def test_settings_comparison_times_each_setting_in_turns():
    out = run_script(
        "bench_step.py",
        "--modes=compare",
        *TINY,
        "--config.batch_size=8",
        "--settings=xla_default,reduce",
        "--rounds=2",
        "--steps_per_round=1",
    )
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| xla_default", "| reduce"]
    assert rows[0].endswith("| 1.00x |")  # the first setting is the base
    assert "2 x 1 steps each, interleaved" in out
    assert "XLA_FLAGS for all: --xla_backend_extra_options=xla_cpu_flatten_after_fusion" in out
    # Any config key: the cost of a feature form, timed the same way.
    out = run_script(
        "bench_step.py",
        "--modes=compare",
        *TINY,
        "--config.batch_size=8",
        "--key=loss.feat_form",
        "--settings=attention,fused_map",
        "--rounds=1",
        "--steps_per_round=1",
    )
    assert "| loss.feat_form | min ms |" in out
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| attention", "| fused_map"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "key,settings",
    [
        ("cpu_kernels.thread", ["kernel_thread", "caller"]),
        ("cpu_kernels.residual_end", ["separate", "fused"]),
    ],
)
def test_kernel_comparisons_time_each_setting(key, settings, tmp_path):
    """Where the kernels' work runs (one compiled step, switched between turns) and a residual
    block's end fused into the BatchNorm kernel or left to XLA (a step traced for each)."""
    from ffcl_jax import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip(f"oneDNN kernels: {cpu_kernels.unavailable_reason()}")
    out = run_script(
        "bench_step.py",
        "--modes=compare",
        *TINY,
        "--config.batch_size=8",
        "--config.cpu.kernels=onednn",
        f"--key={key}",
        f"--settings={','.join(settings)}",
        "--rounds=2",
        "--steps_per_round=1",
        f"--output={tmp_path / 'compare.json'}",
    )
    assert f"| {key} | min ms | median ms | max ms | speed-up |" in out
    assert "OpenMP: " in out
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == [f"| {s}" for s in settings]
    # The same measurement as a JSON to commit: every timed step, the command, the table.
    record = json.loads((tmp_path / "compare.json").read_text())
    assert record["key"] == key and list(record["settings"]) == settings
    assert record["command"].startswith("python experiments/bench_step.py --modes=compare")
    for timing in record["settings"].values():
        assert len(timing["times_ms"]) == 2 and timing["min_ms"] == min(timing["times_ms"])
    assert record["table"] in out


@pytest.mark.slow
def test_malloc_comparison_runs_each_setting_in_a_worker_started_with_it(tmp_path):
    """glibc reads its tunables at start-up: each setting's worker must report its own, and
    `system` must not fall back to the benchmark's default."""
    from ffcl_jax import process_env

    if not process_env.malloc_tunables("retain"):
        pytest.skip("glibc's malloc tunables take no effect here")
    out = run_script(
        "bench_step.py",
        "--modes=compare",
        *TINY,
        "--config.batch_size=8",
        "--key=cpu.malloc",
        "--settings=system,retain",
        "--rounds=1",
        "--repeats=2",
        "--warmup=1",
        f"--output={tmp_path / 'compare.json'}",
    )
    assert "| cpu.malloc | page faults a step | system s a step | GLIBC_TUNABLES |" in out
    record = json.loads((tmp_path / "compare.json").read_text())
    system, retain = record["settings"]["system"], record["settings"]["retain"]
    assert process_env.malloc_choice(system["glibc_tunables"]) == "system"
    assert retain["glibc_tunables"] == ":".join(process_env.MALLOC_TUNABLES["retain"])
    for timing in (system, retain):
        assert len(timing["times_ms"]) == 2 and len(timing["page_faults_per_step"]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("kernels", ["xla", "onednn"])
def test_profile_mode_lists_where_the_step_spends_its_time(kernels, tmp_path):
    from ffcl_jax import cpu_kernels

    if kernels == "onednn" and not cpu_kernels.available():
        pytest.skip(f"oneDNN kernels: {cpu_kernels.unavailable_reason()}")
    args = ["--modes=profile", *TINY, "--config.batch_size=8", "--top=40"]
    output = tmp_path / "profile.json"
    out = run_script(
        "bench_step.py", *args, f"--config.cpu.kernels={kernels}", f"--output={output}"
    )
    record = json.loads(output.read_text())
    assert record["table"] in out and record["cpu_kernels"] == kernels
    assert sum(row["calls"] for row in record["by_kind"]) >= len(record["longest"]) > 0
    by_kind, longest = out.split("Longest ops:")
    rows = [line.split(" | ") for line in by_kind.splitlines() if line.startswith("| ")][1:]
    assert rows and all(float(row[0].strip("| ")) >= 0 for row in rows)
    kinds = [row[2].strip(" |`") for row in rows]
    assert len(kinds) == len(set(kinds))  # one row per kind of op, instance numbers dropped
    # The convolutions are oneDNN's custom calls, or XLA's own ops.
    assert ("ffi_call" in kinds) is (kernels == "onednn")
    assert "one call:" in longest and "ms wall" in longest


def test_primitive_lines_parse_in_both_of_onednns_verbose_formats():
    import primitive_times

    shape = "mb128_ic16oc32_ih28oh14kh3sh2dh0ph1_iw28ow14kw3sw2dw0pw1"
    old = f"onednn_verbose,exec,cpu,convolution,jit:avx512_core,backward_data,src,,alg,{shape},2.5"
    new = (
        "onednn_verbose,v1,primitive,exec,cpu,convolution,brgconv:avx512_core,"
        f"forward_training,src,attr,alg,{shape},0.75"
    )
    assert primitive_times.parse_primitive_line(old) == (
        "convolution",
        "jit:avx512_core",
        "backward_data",
        shape,
        2.5,
    )
    assert primitive_times.parse_primitive_line(new)[1:3] == (
        "brgconv:avx512_core",
        "forward_training",
    )
    for other in ("onednn_verbose,info,cpu,isa:AVX-512", "onednn_verbose,create:cache_miss,x,1"):
        assert primitive_times.parse_primitive_line(other) is None
    # One multiply-add per weight per output position: 128 x 14 x 14 outputs x 32 x (16 x 3 x 3).
    assert primitive_times.convolution_gflop(shape) == 2 * 128 * 14 * 14 * 32 * 16 * 9 / 1e9
    depthwise = "g128mb128_ic128oc128_ih7oh7kh3sh1dh0ph1_iw7ow7kw3sw1dw0pw1"
    assert primitive_times.convolution_gflop(depthwise) == 2 * 128 * 7 * 7 * 128 * 9 / 1e9
    lines = [primitive_times.STEP_MARKER, old, old, primitive_times.STEP_MARKER, old]
    rows = primitive_times._primitive_rows(lines, [10.0, 9.0])
    assert rows["onednn_ms"] == [5.0, 2.5]
    # Each primitive's calls in the first step, and its fastest step's ms.
    [row] = rows["primitives"]
    assert (row["calls"], row["ms"]) == (2, 2.5)


@pytest.mark.slow
def test_primitives_mode_times_each_frameworks_onednn_primitives(tmp_path):
    from ffcl_jax import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip(f"oneDNN kernels: {cpu_kernels.unavailable_reason()}")
    output = tmp_path / "primitives.json"
    out = run_script(
        "bench_step.py",
        "--modes=primitives",
        *TINY,
        "--repeats=2",
        "--warmup=1",
        "--config.cpu.kernels=onednn",
        f"--output={output}",
    )
    record = json.loads(output.read_text())
    assert record["table"] in out
    for side in ("jax", "pytorch"):
        result = record[side]
        assert len(result["step_wall_ms"]) == len(result["onednn_ms"]) == 2
        convolutions = [r for r in result["primitives"] if r["kind"] == "convolution"]
        # resnet8: the stem, 6 block convolutions and 2 projections, each forward at least.
        forward = [r for r in convolutions if r["pass"].startswith("forward")]
        assert sum(r["calls"] for r in forward) >= 2 * 9
        assert all(r["gflop_per_s"] > 0 and r["ms"] > 0 for r in convolutions)
        assert min(result["onednn_ms"]) <= max(result["step_wall_ms"])


@pytest.mark.slow
def test_kernel_benchmark_times_every_layer_of_the_demo_pair(tmp_path):
    from ffcl_jax import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip(f"oneDNN kernels: {cpu_kernels.unavailable_reason()}")
    output = tmp_path / "kernels.json"
    out = run_script("bench_kernels.py", "--batch=2", "--repeats=1", f"--output={output}")
    record = json.loads(output.read_text())
    assert set(record["results"]) == {"onednn", "xla", "torch"}
    import bench_kernels

    for framework, layers in record["results"].items():
        assert set(layers) == {row[0] for row in bench_kernels.CONVS + bench_kernels.BATCH_NORMS}
        for name, parts in layers.items():
            for part in parts.values():
                assert 0 <= part["min_ms"] <= part["median_ms"], (framework, name)
    assert "| 16-channel convolutions (28x28) |" in out and "xla / onednn" in out
    from ffcl_jax import process_env

    expected = "retain" if process_env.malloc_tunables("retain") else "system"
    assert process_env.malloc_choice(record["glibc_tunables"]) == expected


@pytest.mark.slow
def test_checkpoint_mode_times_a_save_and_a_restore_of_the_whole_cohort(tmp_path):
    out = run_script(
        "bench_step.py",
        "--modes=checkpoint",
        *TINY,
        "--repeats=2",
        f"--checkpoint_dir={tmp_path}",
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["pair"] == "resnet8+resnet8" and result["parameters"] > 2 * 70_000
    assert 0 < result["save_blocking_s_median"] <= result["save_complete_s_median"]
    assert result["restore_s_median"] > 0 and result["checkpoint_mb"] > 0.5  # float32 params
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]


def test_the_readme_table_shows_recorded_commands_under_todays_key_names():
    recorded = "python experiments/bench_step.py --repeats=10 --config.cpu_kernels=xla"
    shown = bench_results.command_today(recorded)
    assert shown == "python experiments/bench_step.py --repeats=10 --config.cpu.kernels=xla"
    assert bench_results.command_today(shown) == shown


def test_readme_names_the_ynnpack_setting():
    key = "xla_cpu_experimental_ynn_fusion_type"
    assert bench_results.ynn_setting(None) == "xla defaults"
    assert bench_results.ynn_setting({key: ""}) == "ynn off"
    assert bench_results.ynn_setting({key: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}) == (
        "ynn individual_dot"
    )
    both = "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"
    assert bench_results.ynn_setting({key: both}) == "ynn eltwise+reduce"


@pytest.mark.slow
def test_study_runs_run_each_run_once_and_train_a_missing_kd_teacher_again(fmnist_dir, tmp_path):
    """The drivers' run loop (`study_runs.run_missing`): every run once, a kd run after its own
    seed's teacher, nothing again once finished; on a machine with only the committed summaries a
    kd run trains its teacher again beside the runs and leaves the committed summary alone."""
    root, output = tmp_path / "runs", tmp_path / "out" / "study"
    extra = (
        f"idx_dir={fmnist_dir},teacher=resnet8,student=resnet8,batch_size=32,num_epochs=1,"
        "lr_decay_epochs=(),augment=none,log_every_steps=4,eval_batch_size=50"
    )
    args = argparse.Namespace(
        config="configs/fashion_mnist.py",
        root=str(root),
        output=str(output),
        extra=extra.split(","),
    )
    independent = study_runs.Run("independent", "jax", ("method=independent",), "alone")
    kd = study_runs.Run("kd", "jax", ("method=kd",), "kd", needs="independent")
    reference = study_runs.Run("ffcl", "pytorch", ("method=ffcl",), "reference")
    plan = [(run, seed) for seed in (0, 1) for run in (independent, kd, reference)]

    def run_all():
        study_runs.run_missing(plan, args, {"process": None}, lambda: None)
        for run, seed in plan:
            study_runs.keep_copy(run, seed, args)

    run_all()
    finished = sorted(os.listdir(root))
    assert finished == [
        f"{framework}_{name}_seed{seed}"
        for framework, name, seed in [
            ("jax", "independent", 0),
            ("jax", "independent", 1),
            ("jax", "kd", 0),
            ("jax", "kd", 1),
            ("pytorch", "ffcl", 0),
            ("pytorch", "ffcl", 1),
        ]
    ]
    kd_seed1 = study_runs.ran_command(kd, 1, args).split()
    assert "--config.method=kd" in kd_seed1
    assert f"--config.teacher_checkpoint={root / 'jax_independent_seed1'}" in kd_seed1
    assert study_runs.finished(reference, 0, args)["summary"]["student"]["last"] > 0
    assert (tmp_path / "out" / "study_runs" / "jax_kd_seed0" / "metrics.jsonl").exists()

    # A second call finds every run finished and starts nothing.
    stamps = {name: os.path.getmtime(root / name / "results.json") for name in finished}
    run_all()
    assert stamps == {name: os.path.getmtime(root / name / "results.json") for name in finished}

    # On a new machine only the committed summaries are left: a kd run still to do trains its
    # teacher again beside the runs and leaves the teacher run's committed summary alone.
    import shutil

    shutil.rmtree(root / "jax_independent_seed0" / "checkpoints")
    shutil.rmtree(root / "jax_independent_seed1" / "checkpoints")
    shutil.rmtree(root / "jax_kd_seed0")
    shutil.rmtree(tmp_path / "out" / "study_runs" / "jax_kd_seed0")
    kept = (tmp_path / "out" / "study_runs" / "jax_independent_seed0" / "results.json").read_bytes()
    run_all()
    copy = tmp_path / "runs_teachers" / "jax_independent_seed0"
    assert (copy / "results.json").exists() and (copy / "checkpoints").is_dir()
    kd_command = json.loads((root / "jax_kd_seed0" / "table_run.json").read_text())["command"]
    assert f"--config.teacher_checkpoint={copy}" in kd_command.split()
    assert (root / "jax_kd_seed0" / "results.json").exists()
    assert (
        kept
        == (tmp_path / "out" / "study_runs" / "jax_independent_seed0" / "results.json").read_bytes()
    )
    assert sorted(os.listdir(tmp_path / "runs_teachers")) == ["jax_independent_seed0"]
    # The record names the teacher each kd run used, not the copy a new run would use.
    used = f"--config.teacher_checkpoint={root / 'jax_independent_seed1'}"
    assert used in study_runs.ran_command(kd, 1, args).split()
    assert f"--config.teacher_checkpoint={copy}" in study_runs.ran_command(kd, 0, args).split()


def test_compile_for_table_is_the_one_the_committed_reports_give(tmp_path):
    """docs/performance.md's table "Compiled for TPU slices" is what `bench_step.py --readme`
    writes from the committed `compile_for_*.json` reports."""
    rows = _generated_table("compile-for", bench_results.write_compile_for_table, tmp_path)
    assert len(rows) == 2 + len(
        [f for f in os.listdir(bench_results.RESULTS) if f.startswith("compile_for_")]
    )
    assert _committed_table("compile-for") == rows


def _generated_table(name: str, write, tmp_path) -> list[str]:
    """The rows `write(results, doc)` puts between a fresh doc's `name` markers."""
    doc = tmp_path / "performance.md"
    doc.write_text(f"a\n<!-- {name}:start -->\nold\n<!-- {name}:end -->\nb\n")
    write(bench_results.RESULTS, str(doc))
    return _table_block(name, doc.read_text())


def _committed_table(name: str) -> list[str]:
    with open(os.path.join(ROOT, "docs", "performance.md")) as f:
        return _table_block(name, f.read())


def _table_block(name: str, text: str) -> list[str]:
    return (
        text.split(f"<!-- {name}:start -->")[1]
        .split(f"<!-- {name}:end -->")[0]
        .strip()
        .splitlines()
    )


def test_pod_scaling_table_covers_every_slice_from_its_committed_reports(tmp_path):
    """docs/performance.md's before/after table: one row per slice of the scaling table, each
    from that slice's three reports, as `bench_step.py --readme` writes it."""
    import re

    slices = {
        m.group(1)
        for f in os.listdir(bench_results.RESULTS)
        if (m := re.fullmatch(r"compile_for_cifar100_tpu_(v\d+[a-z]?_[\dx]+)\.json", f))
    }
    assert slices and set(bench_results.pod_scaling_reports()) == slices
    rows = _generated_table("pod-scaling", bench_results.write_pod_scaling_table, tmp_path)
    assert len(rows) == 2 + len(slices)
    assert _committed_table("pod-scaling") == rows
    # A row reads its own slice's reports: the v5e:2x2 row's before-bound is that report's.
    with open(os.path.join(bench_results.RESULTS, "compile_for_cifar100_tpu_v5e_2x2.json")) as f:
        before = json.load(f)["train_step"]["roofline"]["step_bound_seconds"] * 1e3
    [row] = [r for r in rows if r.startswith("| v5e:2x2 |")]
    assert f"| {before:.2f}, " in row


def test_paired_difference_matches_a_paired_t_test():
    import scipy.stats

    def records(lasts):
        return [
            {"seed": seed, "summary": {"student": {"last": last}}} for seed, last in lasts.items()
        ]

    mine = records({0: 0.894, 1: 0.889, 2: 0.895})
    reference = records({2: 0.890, 0: 0.891, 1: 0.885, 3: 0.5})  # seed 3: no partner, unused
    diff = study_stats.paired_difference(mine, reference)
    expected = scipy.stats.ttest_rel([89.4, 88.9, 89.5], [89.1, 88.5, 89.0])
    assert diff["n"] == 3
    assert diff["mean"] == pytest.approx((0.3 + 0.4 + 0.5) / 3)
    interval = expected.confidence_interval(0.95)
    assert diff["ci95"] == pytest.approx([interval.low, interval.high])
    cell = study_stats.format_difference(diff, "independent")
    assert cell.startswith("**+0.40 [") and cell.endswith("vs independent (n=3)")  # excludes 0
    single = study_stats.paired_difference(mine[:1], reference)
    assert "ci95" not in single
    assert study_stats.format_difference(single, "ffcl") == "+0.30 vs ffcl (n=1)"
    wide = study_stats.paired_difference(records({0: 0.893, 1: 0.888}), reference)
    assert study_stats.format_difference(wide, "ffcl").startswith("+0.25 [")  # includes 0: plain
    assert study_stats.format_difference(None, None) == "-"


def _study_record(name: str, seed: int, validation: float, test: float) -> dict:
    history = [{"epoch": 1, "split": "validation", "student": validation - 0.01}]
    history.append({"epoch": 2, "split": "validation", "student": validation})
    results = {
        "eval_split": "validation",
        "history": history,
        "final_test": {"epoch": 2, "split": "test", "student": test},
    }
    return {"run": name, "seed": seed, "results": results}


# Each plan's committed outputs: what its --report_only must rewrite byte for byte.
COMMITTED = {
    "method_study_2026_11": (
        "experiments/results/archive/fashion_mnist_method_study.md",
        "experiments/results/archive/fashion_mnist_selection.json",
        "experiments/results/archive/fashion_mnist_final.json",
        "experiments/results/archive/fashion_mnist_final_student.png",
    ),
    "powered_2026_12": (
        "experiments/results/fashion_mnist_powered.md",
        "experiments/results/fashion_mnist_powered.json",
    ),
}


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_report_only_rewrites_the_committed_study_reports_byte_for_byte(name, tmp_path):
    """`study.py --plan=<plan> --report_only` re-derives the committed report from the committed
    runs: run against a copy of the outputs (the runs linked, not copied), every file comes
    out byte for byte as committed."""
    plan = study_runs.load(os.path.join(PLANS, f"{name}.py"))
    for path in COMMITTED[name]:
        os.makedirs(os.path.dirname(tmp_path / path), exist_ok=True)
        (tmp_path / path).write_bytes(b"")  # each must be written again
    for phase in plan.phases():
        os.symlink(os.path.join(ROOT, phase.output + "_runs"), tmp_path / (phase.output + "_runs"))
    # The study file: the committed text outside its blocks, the blocks empty.
    with open(os.path.join(ROOT, plan.final.study_file)) as f:
        text = f.read()
    for block in {phase.block for phase in plan.phases()}:
        start, end = f"<!-- {block}:start -->", f"<!-- {block}:end -->"
        before, rest = text.split(start, 1)
        text = f"{before}{start}\n{end}{rest.split(end, 1)[1]}"
    (tmp_path / plan.final.study_file).write_text(text)
    argv = [f"--plan={os.path.join(PLANS, name + '.py')}", f"--repo={tmp_path}", "--report_only"]
    study.main([*argv, f"--workdirs={tmp_path / 'workdirs'}"])
    for path in COMMITTED[name]:
        with open(os.path.join(ROOT, path), "rb") as f:
            assert (tmp_path / path).read_bytes() == f.read(), path


def test_the_driver_refuses_a_plan_it_cannot_run(tmp_path):
    """A missing plan file, a module without get_plan(), --phase=select on a plan without a
    selection, an unknown row and an unknown record field each get one clear error."""
    import dataclasses

    from ffcl_jax.errors import UserError

    with pytest.raises(UserError, match="no plan file"):
        study_runs.load(str(tmp_path / "missing.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(UserError, match="get_plan"):
        study_runs.load(str(tmp_path / "empty.py"))
    powered = os.path.join(PLANS, "powered_2026_12.py")
    with pytest.raises(UserError, match="no selection phase"):
        study.main([f"--plan={powered}", "--phase=select", "--report_only"])
    with pytest.raises(UserError, match="--rows: unknown"):
        study.main([f"--plan={powered}", "--rows=ffcl,fcl", f"--repo={tmp_path}", "--report_only"])
    plan = study_runs.load(powered)
    phase = dataclasses.replace(plan.final, record_fields=("run", "sead"))
    with pytest.raises(UserError, match="sead"):
        study.collect(phase, None, [])


def test_study_selection_reads_validation_only():
    """The selected configuration is the best mean last-epoch validation student; the final
    test numbers, however arranged, change nothing, and a run evaluated on the test split is
    refused."""
    grid = plan_module("method_study_2026_11").GRID
    records = [
        _study_record("ffcl-att-reg1", 0, 0.880, 0.990),
        _study_record("ffcl-att-reg1", 1, 0.884, 0.990),
        _study_record("ffcl-fused-reg1", 0, 0.890, 0.100),
        _study_record("ffcl-fused-reg1", 1, 0.880, 0.100),
        _study_record("ffl-tau2", 0, 0.870, 0.500),
        _study_record("ffl-default", 0, 0.870, 0.900),  # a tie: the earlier in the grid wins
    ]
    selected = study_report.select(records, grid)
    assert selected["ffcl"]["run"] == "ffcl-fused-reg1"
    assert selected["ffcl"]["validation_student"] == pytest.approx(0.885)
    assert selected["ffl"]["run"] == "ffl-default"
    for record in records:  # swap the test numbers around: the selection stays
        record["results"]["final_test"]["student"] = (
            1.0 - record["results"]["final_test"]["student"]
        )
    assert study_report.select(records, grid) == selected
    leaky = _study_record("ffl-tau4", 0, 0.99, 0.99)
    leaky["results"]["eval_split"] = "test"
    with pytest.raises(ValueError, match="validation split"):
        study_report.select([*records, leaky], grid)
    assert len(grid) == 16
    assert {r.name.split("-")[0] for r in grid[:8]} == {"ffcl"}


@pytest.mark.slow
def test_study_driver_runs_the_grid_on_a_validation_split(fmnist_dir, tmp_path, capsys):
    """The method study's plan, from the command line: its selection grid (two configurations
    of it) on a validation split, the report in the plan's files under --repo; the final phase
    waits for a seed every configuration finished."""
    root = tmp_path / "runs" / "method_study"
    archive = tmp_path / "experiments" / "results" / "archive"
    archive.mkdir(parents=True)
    output = archive / "fashion_mnist_selection"
    study_md = archive / "fashion_mnist_method_study.md"
    study_md.write_text("x\n<!-- selection:start -->\n<!-- selection:end -->\n")
    extra = (
        f"idx_dir={fmnist_dir},teacher=resnet8,student=resnet8,batch_size=32,num_epochs=1,"
        "lr_decay_epochs=(),augment=none,log_every_steps=4,eval_batch_size=50,"
        "validation_size=40"
    )
    study.main(
        [
            f"--plan={os.path.join(PLANS, 'method_study_2026_11.py')}",
            "--seeds=0",
            "--rows=ffcl-fused-reg0.1,ffl-tau2",
            f"--workdirs={tmp_path / 'runs'}",
            f"--repo={tmp_path}",
            f"--extra={extra}",
        ]
    )
    assert sorted(os.listdir(root)) == ["jax_ffcl-fused-reg0.1_seed0", "jax_ffl-tau2_seed0"]
    out = capsys.readouterr().out
    progress = [x for x in out.splitlines() if x.startswith("== selection")]
    assert progress[0] == "== selection: 0 of 2 runs finished"
    assert progress[1].startswith("== selection: 1 of 2 runs finished, about 0.0 h left")
    assert len(progress) == 2
    assert "== final comparison: waits for a seed every configuration finished" in out
    summary = json.loads(output.with_suffix(".json").read_text())
    assert set(summary["selected"]) == {"ffcl", "ffl"}
    commands = " ".join(r["command"] for r in summary["runs"])
    assert "--config.validation_size=40" in commands and "feat_form=fused_map" in commands
    assert "--config.validation_size=5000" not in commands  # --extra replaces the plan's
    assert summary["validation_size"] == 40
    text = study_md.read_text()
    assert "| **ffl-tau2** |" in text and "| ffl-default |" in text and "pending" in text
    started = json.loads((root / "jax_ffl-tau2_seed0" / "table_run.json").read_text())
    assert started["machine"] == study_runs.machine_line() and "-core " in started["machine"]
    isa = bench_results.machine()["isa"]
    assert f"min ({isa}) |" in text
    results = json.loads((root / "jax_ffl-tau2_seed0" / "results.json").read_text())
    # A selection run never evaluates the test split (config.final_test is off).
    assert results["eval_split"] == "validation" and results["final_test"] is None


def test_study_final_rows_follow_the_selection_and_read_complete_seeds(tmp_path):
    """The final comparison takes the selected overrides, ablates each term the selection has
    on, judges the selection only on seeds every configuration finished, and reports paired
    differences from the runs' results."""
    import argparse

    import scipy.stats

    module = plan_module("method_study_2026_11")
    final_phase = module.get_plan().final
    best = "ffcl-fused-reg0.1"
    records = [
        _study_record(run.name, 0, 0.95 if run.name == best else 0.80, 0.5) for run in module.GRID
    ]
    records.append(_study_record("ffl-tau4", 1, 0.99, 0.5))  # seed 1 is incomplete: ignored
    assert study_report.complete_seeds(records, module.GRID) == [0]
    selected = study_report.select(records, module.GRID, [0])
    assert selected["ffcl"]["run"] == "ffcl-fused-reg0.1"
    assert selected["ffl"]["run"] == "ffl-default"  # every FFL config tied on seed 0
    rows = study.rows_of(final_phase, final_phase.seeds, selected)
    by_name = {(run.name, run.framework): (run, seeds) for run, seeds in rows}
    ffcl, seeds = by_name[("ffcl", "jax")]
    assert seeds == (0, 1, 2, 3, 4)
    assert "loss.feat_form=fused_map" in ffcl.overrides and "loss.lam_reg=0.1" in ffcl.overrides
    feature, ablation_seeds = by_name[("ffcl-feature", "jax")]
    assert ablation_seeds == (0, 1, 2) and feature.ablation
    assert (
        "loss.lam_feat=0.0" in feature.overrides and "loss.feat_form=fused_map" in feature.overrides
    )
    assert by_name[("kd", "jax")][0].needs == "independent"
    assert by_name[("ffcl", "pytorch")][0].overrides == ffcl.overrides
    # A selection without the feature term has no feature ablation (it is off already).
    none = module.final_runs(
        {
            **selected,
            "ffcl": {
                "run": "ffcl-none-reg1",
                "overrides": ["method=ffcl", "loss.lam_feat=0.0", "loss.lam_reg=1.0"],
            },
        }
    )
    assert "ffcl-feature" not in {run.name for run, _ in none}
    merged = module.merged(("a=1", "b=2"), "a=3")
    assert merged == ("a=3", "b=2")

    # The report reads each run's results and pairs by seed.
    final_args = argparse.Namespace(
        config="configs/fashion_mnist.py",
        root=str(tmp_path / "runs"),
        output=str(tmp_path / "final"),
        extra=[],
    )
    finished = {
        ("ffcl", "jax"): 0.90,
        ("independent", "jax"): 0.89,
        ("independent", "pytorch"): 0.88,
        ("ffcl-feature", "jax"): 0.87,
        ("ffcl", "pytorch"): 0.895,
    }
    for (name, framework), value in finished.items():
        run = by_name[(name, framework)][0]
        for seed in (0,) if (name, framework) == ("ffcl", "pytorch") else (0, 1):
            folder = tmp_path / "runs" / study_runs.run_id(run, seed)
            folder.mkdir(parents=True)
            last = value + 0.001 * seed
            summary = {"student": {"last": last, "best": last}}
            history = [{"epoch": 1, "student": last - 0.02}, {"epoch": 2, "student": last}]
            results = {"summary": summary, "history": history, "wall_seconds": 600.0}
            (folder / "results.json").write_text(json.dumps(results))
            if name == "ffcl":  # wall times are shown with the ISA of the runs that recorded it
                isa = ("AVX2", "AVX-512")[seed]
                started = {"machine": f"2-core AMD EPYC ({isa})"}
                (folder / "table_run.json").write_text(json.dumps(started))
    study_md, readme = tmp_path / "study.md", tmp_path / "README.md"
    final_args.study_file = str(study_md)
    study_md.write_text("<!-- final:start -->\n<!-- final:end -->\n")
    block = "<!-- fashion-mnist-study:start -->\n<!-- fashion-mnist-study:end -->"
    readme.write_text(f"a\n{block}\nb\n")
    seeds = final_phase.seeds
    written = study.report(final_phase, final_args, rows, seeds, {"seeds": [0]}, str(readme))
    assert written["selection"] == {"seeds": [0]} and len(written["runs"]) == 9
    assert list(written) == ["selection", "runs"]
    text = study_md.read_text()
    assert "| ffcl - independent (paired by seed) | **+1.00 [+1.00, +1.00]** (n=2) |" in text
    assert "| ffcl - dml (paired by seed) | pending |" in text
    # Within each framework, on the seeds PyTorch ran (here seed 0 only).
    assert "| ffcl - independent, pytorch (paired by seed) | +1.50 (n=1) |" in text
    jax_on_pytorch_seeds = "| ffcl - independent, jax on pytorch's seeds (paired by seed) |"
    assert f"{jax_on_pytorch_seeds} +1.00 (n=1) |" in text
    assert "| ffcl-feature - ffcl (paired by seed) | **-3.00 [-3.00, -3.00]** (n=2) |" in text
    welch = scipy.stats.ttest_ind([88.0, 88.1], [89.0, 89.1], equal_var=False)
    interval = welch.confidence_interval(0.95)
    framework_cell = f"**-1.00 [{interval.low:+.2f}, {interval.high:+.2f}]** (n=2/2)"
    assert f"| independent: pytorch - jax (unpaired, Welch) | {framework_cell} |" in text
    assert "| ffcl: pytorch - jax (unpaired, Welch) | -0.55 (n=1/2) |" in text
    assert "| jax | 2/5 | 90.05 ± 0.07 | n/a | n/a | n/a | 10.0 min (AVX-512, AVX2) |" in text
    assert "| jax | 2/5 | 89.05 ± 0.07 | n/a | n/a | n/a | 10.0 min |" in text
    assert "| dml | Deep Mutual Learning | jax | 0/5 | pending |" in text
    assert (tmp_path / "final_student.png").stat().st_size > 0
    plan = [(run, seed) for run, seeds in rows for seed in seeds]
    done = 3 * 2 + 2 + 1  # three JAX rows and PyTorch's independent on 2 seeds, its FFCL on 1
    hours = (len(plan) - done) * 600 / 3600
    progress = study.progress_line("final", plan, final_args)
    expected = f"== final: {done} of {len(plan)} runs finished, about {hours:.1f} h left"
    assert progress == expected + " at the finished runs' mean"
    # The README's summary: the same cells, the methods only.
    summary = readme.read_text().split("\n")
    assert summary[0] == "a" and summary[-2] == "b"
    ffcl_line = next(x for x in summary if x.startswith("| ffcl (FFCL, selected: ffcl-fused"))
    assert "| 90.05 ± 0.07 (2/5 seeds) | - |" in ffcl_line
    independent_line = next(line for line in summary if line.startswith("| independent (T and S"))
    assert "| 89.05 ± 0.07 (2/5 seeds) | **+1.00 [+1.00, +1.00]** (n=2) |" in independent_line
    assert not any("ffcl-feature" in line or "PyTorch" in line for line in summary)
    # Each finished run's results are kept beside the report, to be committed.
    assert (tmp_path / "final_runs" / "jax_ffcl_seed1" / "results.json").exists()


def test_holm_adjusts_like_the_step_down_rule():
    adjusted = study_stats.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    # sorted: a 0.01 x4 = 0.04; c 0.03 x3 = 0.09; b 0.04 x2 = 0.08 -> max(0.09, 0.08); d 0.5 x1
    assert adjusted == pytest.approx({"a": 0.04, "c": 0.09, "b": 0.09, "d": 0.5})


def _powered_report(tmp_path, root):
    """The powered study's report of the runs under `root` (seeds 1000-1003), by the driver
    with its plan (the plan's folders replaced by these): its file, result."""
    import dataclasses

    study_md = tmp_path / "study.md"
    study_md.write_text("<!-- powered:start -->\n<!-- powered:end -->\n")
    powered = study_runs.load(os.path.join(PLANS, "powered_2026_12.py"))
    phase = dataclasses.replace(
        powered.final, root=str(root), output=str(tmp_path / "out"), study_file=str(study_md)
    )
    plan = dataclasses.replace(powered, final=phase)
    args = study.parse_args(["--seeds=1000,1001,1002,1003", "--report_only"])
    return study_md, study.run_phase(plan, phase, args, {"process": None})


def _write_powered_run(root, run_id, value, wall=60.0, machine=None):
    folder = root / run_id
    folder.mkdir(parents=True)
    summary = {"student": {"last": value, "best": value, "best_epoch": 3}}
    results = {"summary": summary, "history": [], "wall_seconds": wall}
    (folder / "results.json").write_text(json.dumps(results))
    if machine is not None:
        (folder / "table_run.json").write_text(json.dumps({"machine": machine}))


def _write_every_powered_run(root, students, walls=None, machine=None):
    """Every run of the study for seeds 1000-1003: the values of `students` where given, else
    one shared spread; `walls` {seed: seconds} (else 60), `machine(run, seed)` (else none)."""
    default = (0.891, 0.897, 0.894, 0.896)
    for run in plan_module("powered_2026_12").RUNS:
        values = students.get((run.framework, run.name), default)
        for index, seed in enumerate((1000, 1001, 1002, 1003)):
            _write_powered_run(
                root,
                f"{run.framework}_{run.name}_seed{seed}",
                values[index],
                wall=(walls or {}).get(seed, 60.0),
                machine=machine(run, seed) if machine else None,
            )


def test_powered_study_pairs_by_seed_and_corrects_for_every_baseline(tmp_path):
    """Once every run is in: FFCL's student minus each baseline's, paired by seed, the paired
    t-test's p Holm-adjusted over the nine baselines, PyTorch minus JAX paired by seed; the
    report block and the JSON hold them."""
    import scipy.stats

    root = tmp_path / "root"
    students = {  # method -> per-seed last-epoch student top-1
        ("jax", "ffcl"): [0.900, 0.905, 0.902, 0.907],
        ("jax", "independent"): [0.890, 0.899, 0.893, 0.899],
        ("jax", "kd"): [0.899, 0.906, 0.900, 0.909],  # FFCL -0.1..+0.2: ties
        ("jax", "pcl"): [0.910, 0.916, 0.911, 0.919],  # FFCL about 1 point behind: loses
        ("pytorch", "ffcl"): [0.904, 0.906, 0.901, 0.909],
    }
    _write_every_powered_run(root, students)
    study, result = _powered_report(tmp_path, root)
    assert result["complete"]
    primary = result["comparisons"]["primary"]
    assert len(primary) == 9 and all(c["n"] == 4 for c in primary.values())
    ffcl, independent = students["jax", "ffcl"], students["jax", "independent"]
    diffs = [100 * (a - b) for a, b in zip(ffcl, independent, strict=True)]
    assert primary["independent"]["differences"] == pytest.approx(diffs)
    p_independent = scipy.stats.ttest_1samp(diffs, 0.0).pvalue
    assert primary["independent"]["p"] == pytest.approx(p_independent)
    expected = study_stats.holm({name: c["p"] for name, c in primary.items()})
    assert expected["independent"] > p_independent
    for name, c in primary.items():
        assert c["p_holm"] == pytest.approx(expected[name])
    assert primary["independent"]["sd"] == pytest.approx(statistics.stdev(diffs))
    assert primary["independent"]["ahead"] == 4 and primary["pcl"]["ahead"] == 0
    readings = {name: c["reading"] for name, c in primary.items()}
    assert (readings["independent"], readings["kd"], readings["pcl"]) == ("beats", "ties", "loses")
    framework = result["comparisons"]["pytorch_minus_jax"]["ffcl"]
    assert framework["mean"] == pytest.approx(100 * (0.905 - 0.9035))
    text = study.read_text()
    assert "| `independent` | +0.82 [" in text and "Holm p" in text
    assert "| 0.17 | 4 of 4 | **beats** |" in text and "| 0 of 4 | **loses** |" in text
    assert "All 48 runs (4 seeds) are in" in text
    assert json.loads((tmp_path / "out.json").read_text())["comparisons"] == json.loads(
        json.dumps(result["comparisons"])
    )


def test_powered_study_progress_reports_carry_no_test(tmp_path):
    """The protocol tests once, on every seed: until then the report (and its JSON) holds the
    mean differences over the seeds both runs have, and no interval, p or Holm p."""
    root = tmp_path / "root"
    students = {
        ("jax", "ffcl"): [0.900, 0.905, 0.902, 0.907],
        ("jax", "independent"): [0.890, 0.899, 0.893, 0.899],
        ("jax", "pcl"): [0.901, 0.903, 0.904],  # one seed missing: 3 pairs
    }
    for (framework, method), values in students.items():
        for seed, value in zip((1000, 1001, 1002, 1003), values, strict=False):
            _write_powered_run(root, f"{framework}_{method}_seed{seed}", value)
    study, result = _powered_report(tmp_path, root)
    assert not result["complete"]
    primary = result["comparisons"]["primary"]
    assert primary["independent"]["mean"] == pytest.approx(0.825)
    assert primary["pcl"]["seeds"] == [1000, 1001, 1002] and primary["dml"]["n"] == 0
    written = json.loads((tmp_path / "out.json").read_text())
    for section in (written["comparisons"], written["one_machine"]["comparisons"]):
        for comparison in (*section["primary"].values(), *section["pytorch_minus_jax"].values()):
            assert not {"p", "p_holm", "ci95"} & set(comparison)
    text = study.read_text()
    assert "| `independent` | +0.82 (n=4; interim mean, no interval or test) |" in text
    assert "Holm p" not in text and "p = " not in text and "**beats**" not in text
    assert "Progress: 11 of 48 runs (4 seeds)" in text
    assert "Wall time of the finished runs: 0.2 h." in text  # 11 runs of 60 s


def test_powered_study_sensitivity_keeps_the_seeds_that_ran_on_one_machine_kind(tmp_path):
    """The protocol's sensitivity analysis: only seeds whose every run ran on the most common
    machine kind, with the same comparisons; the report says so, and wall time is a median."""
    root = tmp_path / "root"
    amd, intel = "2-core AMD EPYC (AVX-512)", "2-core Intel Xeon (AVX-512)"

    def machine(run, seed):  # seed 1001: one run on another kind
        if seed == 1003 or (seed == 1001 and (run.framework, run.name) == ("jax", "independent")):
            return intel
        return amd

    students = {
        ("jax", "ffcl"): (0.900, 0.905, 0.902, 0.9),
        ("jax", "independent"): (0.890, 0.899, 0.894, 0.8),
    }
    walls = {1000: 60.0, 1001: 600.0, 1002: 120.0, 1003: 90.0}
    _write_every_powered_run(root, students, walls=walls, machine=machine)
    study, result = _powered_report(tmp_path, root)
    assert result["comparisons"]["primary"]["independent"]["n"] == 4
    one_machine = result["one_machine"]
    assert one_machine["machine"] == amd and one_machine["seeds"] == [1000, 1002]
    kept = one_machine["comparisons"]["primary"]["independent"]
    assert kept["differences"] == pytest.approx([1.0, 0.8]) and "p_holm" in kept
    text = study.read_text()
    assert f"the 2 of 4 seeds whose runs all ran on one kind, {amd} (seeds 1000, 1002)" in text
    assert "| `independent` | +0.90 [" in text
    # the median of 60, 600, 120 and 90 seconds, not their mean (3.6 min)
    assert "| `ffcl` | jax | 4 |" in text and "| 1.8 min (AVX-512) |" in text


def test_powered_study_lists_each_command_once_with_its_seeds(tmp_path):
    """The report names each run's command once, `{seed}` for the seed, with the seeds that ran
    it; a run that ran anything else, or other code, is named apart."""
    root = tmp_path / "root"
    _write_every_powered_run(root, {})
    odd = {
        "command": "python -m ffcl_jax.main --config.seed=1002 --config.method=dml --x=1",
        "commit": "abc1234",
    }
    (root / "jax_dml_seed1002" / "table_run.json").write_text(json.dumps(odd))
    study, _ = _powered_report(tmp_path, root)
    text = study.read_text()
    dml = f"--workdir={root}/jax_dml_seed{{seed}} --config.seed={{seed}} --config.method=dml`"
    start = "python -m ffcl_jax.main --config=configs/fashion_mnist.py"
    assert f"- seeds 1000-1001, 1003: `{start} {dml}" in text
    assert (
        "- seeds 1002: `python -m ffcl_jax.main --config.seed={seed} --config.method=dml --x=1`"
        in text
    )
    assert "- seeds 1000-1003: `python -m ffcl_jax.main" in text  # every other method
    assert "more than one commit: `unrecorded` (47 runs), `abc1234` (1 run)" in text


def _powered_records(students: dict, seeds, resumed=()) -> list[dict]:
    """JAX records as `study.collect` makes them: `students` {method: per-seed points} (else
    FFCL's minus about one point), the runs in `resumed` resumed at step 46."""
    ffcl = students["ffcl"]
    records = []
    for run in plan_module("powered_2026_12").JAX_RUNS:
        values = students.get(run.name, [v - 1.0 + 0.01 * (i % 3) for i, v in enumerate(ffcl)])
        for seed, value in zip(seeds, values, strict=True):
            rid = f"jax_{run.name}_seed{seed}"
            records.append(
                {
                    "run": rid,
                    "method": run.name,
                    "framework": "jax",
                    "seed": seed,
                    "summary": {"student": {"last": value / 100}},
                    "resumed_at_steps": [46] if rid in resumed else [],
                }
            )
    return records


def test_powered_study_sensitivity_analyses_find_the_seeds_a_reading_rests_on():
    """Wilcoxon with Holm, leave-one-seed-out and the outlier rules, on 20 seeds: DML's tie
    rests on one seed (1019, -5 points: Wilcoxon and the seed's removal read "beats"), PCL's on
    one odd PCL run (seed 1005, resumed: its removal reads "loses")."""
    import scipy.stats

    module = plan_module("powered_2026_12")
    comparisons, rows = module.COMPARISONS, [(run, None) for run in module.RUNS]

    seeds = list(range(1000, 1020))
    ffcl = [89.0 + 0.1 * (i % 7) for i in range(20)]
    dml = [0.3 + 0.02 * i for i in range(19)] + [-5.0]  # FFCL minus DML
    pcl = [-0.3 + 0.1 * ((i * 7) % 5 - 2) for i in range(20)]
    pcl[5] = 4.7  # PCL's run of seed 1005 is 5 points low
    students = {
        "ffcl": ffcl,
        "dml": [f - d for f, d in zip(ffcl, dml, strict=True)],
        "pcl": [f - d for f, d in zip(ffcl, pcl, strict=True)],
    }
    records = _powered_records(students, seeds, resumed={"jax_pcl_seed1005"})
    primary = comparisons.compute_for(rows, records, test=True)["primary"]
    readings = {name: c["reading"] for name, c in primary.items()}
    assert readings == {**dict.fromkeys(primary, "beats"), "dml": "ties", "pcl": "ties"}

    wilcoxon = study_sensitivity.wilcoxon_readings(primary)
    expected = scipy.stats.wilcoxon([round(d, 6) for d in dml]).pvalue
    assert wilcoxon["dml"]["p"] == pytest.approx(expected) and wilcoxon["dml"]["exact"]
    holm = study_stats.holm({name: w["p"] for name, w in wilcoxon.items()})
    assert {name: w["p_holm"] for name, w in wilcoxon.items()} == pytest.approx(holm)
    assert wilcoxon["dml"]["reading"] == "beats" and wilcoxon["independent"]["reading"] == "beats"

    left_out = study_sensitivity.leave_one_seed_out(comparisons, rows, records, primary)
    changes = {
        name: [(c["seed"], c["reading"]) for c in v["changes"]] for name, v in left_out.items()
    }
    assert changes == {
        **dict.fromkeys(primary, []),
        "dml": [(1019, "beats")],
        "pcl": [(1005, "loses")],
    }
    assert left_out["dml"]["seeds"] == 20

    assert study_sensitivity.resumed_runs(records) == {"jax_pcl_seed1005": [46]}
    by_difference = study_sensitivity.without_outliers(records, primary, "difference")
    flagged = {name: [o["seed"] for o in c["outliers"]] for name, c in by_difference.items()}
    assert flagged == {**dict.fromkeys(primary, []), "dml": [1019], "pcl": [1005]}
    assert by_difference["dml"]["n"] == 19 and by_difference["dml"]["reading"] == "beats"
    assert by_difference["dml"]["mean"] == pytest.approx(statistics.fmean(dml[:19]))
    assert by_difference["pcl"]["outliers"][0]["resumed"] == ["jax_pcl_seed1005"]
    assert by_difference["pcl"]["reading"] == "loses"
    assert by_difference["kd"]["n"] == 20 and by_difference["kd"]["reading"] == "beats"
    by_run = study_sensitivity.without_outliers(records, primary, "run")
    (outlier,) = by_run["pcl"]["outliers"]
    assert outlier["seed"] == 1005 and set(outlier["z"]) == {"pcl"} and outlier["z"]["pcl"] < -3
    assert outlier["difference"] == pytest.approx(4.7)
    assert [o["seed"] for o in by_run["independent"]["outliers"]] == []


def test_powered_study_report_holds_the_sensitivity_analyses_once_complete(tmp_path):
    """The complete report's block and JSON hold the sensitivity analyses, DML against the
    branch methods and the ramp-up weight each method logged; a progress report holds none."""
    root = tmp_path / "root"
    students = {
        ("jax", "ffcl"): [0.900, 0.905, 0.902, 0.907],
        ("jax", "dml"): [0.890, 0.899, 0.893, 0.899],
        ("jax", "one"): [0.880, 0.889, 0.884, 0.887],
    }
    _write_every_powered_run(root, students)
    rows = [
        {"kind": "train", "epoch": 1, "rampup_weight": 0.006737947},
        {"kind": "eval", "epoch": 1},
        {"kind": "train", "epoch": 2, "rampup_weight": 1.0},
    ]
    lines = "\n".join(json.dumps(row) for row in rows) + "\n"
    (root / "jax_dml_seed1000" / "metrics.jsonl").write_text(lines)
    results = json.loads((root / "jax_one_seed1000" / "results.json").read_text())
    results["num_params"] = {"peers": 116756, "student": 77754}
    (root / "jax_one_seed1000" / "results.json").write_text(json.dumps(results))
    study, result = _powered_report(tmp_path, root)
    sensitivity = result["sensitivity"]
    assert set(sensitivity["wilcoxon"]) == set(result["comparisons"]["primary"])
    dml_minus = sensitivity["dml_minus_branch_methods"]
    assert list(dml_minus) == list(plan_module("powered_2026_12").BRANCH_METHODS)
    assert dml_minus["one"]["mean"] == pytest.approx(100 * (0.89525 - 0.885))
    assert sensitivity["logged_rampup_weight"] == {"dml": {1: [0.006738], 2: [1.0]}}
    text = study.read_text()
    assert "Wilcoxon signed-rank" in text and "seeds whose removal changes it" in text
    assert "rule: |z| > 3 of the comparison's paired difference" in text
    assert "| `dml` | 0.00674 | 1 |" in text
    assert sensitivity["parameters"] == {"one": {"peers": 116756, "student": 77754}}
    assert "| `one` | peers 116,756, student 77,754 |" in text
    assert "Runs resumed from a checkpoint (`resumed_at_steps`, step): 0." in text
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["sensitivity"]["leave_one_seed_out"]["kd"]["seeds"] == 4

    (root / "jax_pcl_seed1003" / "results.json").unlink()
    (tmp_path / "out_runs" / "jax_pcl_seed1003" / "results.json").unlink()
    study, result = _powered_report(tmp_path, root)
    assert "sensitivity" not in result and "Wilcoxon" not in study.read_text()


def test_powered_study_records_a_dirty_tree_and_every_segment_of_a_resumed_run(
    tmp_path, monkeypatch
):
    """The commit a run records says "-dirty" where the tree has uncommitted changes other
    than the driver's own outputs; a JAX run started again keeps each start (`segments`), and
    the report names every commit its segments ran."""
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*words):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *words],
            cwd=repo,
            check=True,
            capture_output=True,
        )

    git("init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "first")
    monkeypatch.setattr(study_runs, "ROOT", str(repo))
    args = type("Args", (), {"output": str(repo / "results" / "study"), "study_file": None})()
    assert not study_runs.recorded_commit(args).endswith("-dirty")
    (repo / "results").mkdir()
    (repo / "results" / "study.json").write_text("{}")  # the driver's own output
    (repo / "results" / "study_runs").mkdir()
    (repo / "results" / "study_runs" / "run.json").write_text("{}")
    assert not study_runs.recorded_commit(args).endswith("-dirty")
    (repo / "code.py").write_text("x = 2\n")
    assert study_runs.recorded_commit(args).endswith("-dirty")
    assert study_runs.uncommitted(args) == ["code.py"]
    assert len(study_runs.uncommitted()) == 3  # without args, the outputs count too

    commits = iter(["abc1234", "def5678-dirty"])
    monkeypatch.setattr(study_runs, "recorded_commit", lambda args=None: next(commits))
    monkeypatch.setattr(study_runs, "machine_line", lambda: "2-core AMD EPYC (AVX-512)")
    run = study_runs.Run("dml", "jax", ("method=dml",), "DML")
    run_args = type("Args", (), {"root": str(tmp_path / "root"), "config": "c.py", "extra": []})()
    workdir = study_runs.run_workdir(run, 1000, run_args)
    workdir.mkdir(parents=True)
    first = study_runs.start_record(run, 1000, run_args, workdir)
    (workdir / "table_run.json").write_text(json.dumps(first))
    second = study_runs.start_record(run, 1000, run_args, workdir)
    assert [s["commit"] for s in second["segments"]] == ["abc1234", "def5678-dirty"]
    assert second["commit"] == "abc1234" and second["started"] == first["started"]
    assert second["command"] == first["command"]
    assert study_runs.segments_of({"commit": "old"}) == [{"commit": "old"}]

    root = tmp_path / "powered_root"
    _write_every_powered_run(root, {})
    (root / "jax_dml_seed1002" / "table_run.json").write_text(json.dumps(second))
    study, result = _powered_report(tmp_path, root)
    (dml,) = [r for r in result["runs"] if r["run"] == "jax_dml_seed1002"]
    assert dml["commit"] == "abc1234 + def5678-dirty"
    assert "`abc1234 + def5678-dirty` (1 run)" in study.read_text()
