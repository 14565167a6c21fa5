"""JAX against the PyTorch reference: the cohort's train step and a training epoch, same run.

    python experiments/bench_step.py --config=configs/fashion_mnist.py            # demo pair
    python experiments/bench_step.py --config=configs/cifar100.py --modes=step     # default pair
    python experiments/bench_step.py --readme      # rewrite docs/performance.md's table

`step` mode times one jitted, donated JAX train step and one PyTorch reference step (normalise,
forward, every loss term, backward, SGD update, schedule) on the same fixed random uint8 batch of
the config's shape: warm-up excluded, `--repeats` timed steps, min and median. `epoch` mode times
whole training steps with each framework's own input pipeline (JAX: tf.data, or the batches
made on the device with `--config.data_on_device=true`;
PyTorch: the reference's torch augmentation) over
`--epoch_examples` examples of the config's real training split (the whole split by default),
or with `--synthetic_data` of random images of the same shape and number (machines without the
data set, such as GPU nodes without network; neither side's time depends on the pixels).

On a GPU node, the cifar100 pair with JAX's batches made on the device (no tensorflow needed)
and in bfloat16 (losses stay float32; the PyTorch reference then runs under `torch.autocast`
in bfloat16, and with `cudnn.benchmark` on, as CIFAR training scripts set it):

    python experiments/bench_step.py --config=configs/cifar100.py --synthetic_data \
        --config.data_on_device=true --repeats=20
    python experiments/bench_step.py --config=configs/cifar100.py --synthetic_data \
        --config.data_on_device=true --config.compute_dtype=bfloat16 --repeats=20

(`bash experiments/gpu_bench.sh float32|bfloat16` runs them on a GPU machine without network.)

Each framework runs in its own subprocess, one after the other (never both at once): their
thread pools would fight over the cores, and each process's peak memory is then its own.
Peak memory is the process's peak resident set growth over the set-up on a CPU, the allocator's
peak on a GPU; XLA's own buffer plan (`memory_analysis`) is reported beside it.

Results: one JSON per (config, batch size, device, XLA setting) in `experiments/results/`
(`bench_<name>.json`, with the machine description and the command), and `--readme` rewrites
the table between the `bench:start` / `bench:end` markers of docs/performance.md from all of
them.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import readme_block  # experiments/, beside this script
from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: `experiments` and `ffcl_jax` from the repo root
    sys.path.insert(0, ROOT)


def define_flags() -> None:
    """Flags exist only when this file runs as a script: importing it (tests do) next to
    `ffcl_jax.main`, which defines `--config` too, must not clash."""
    config_flags.DEFINE_config_file("config", "configs/fashion_mnist.py", "Config file.")
    flags.DEFINE_list("modes", ["step", "epoch"], "step and/or epoch.")
    flags.DEFINE_integer("repeats", 10, "Timed steps after the warm-up (step mode).")
    flags.DEFINE_integer("warmup", 2, "Untimed steps first (compile, allocator warm-up).")
    flags.DEFINE_integer(
        "epoch_examples", None, "Epoch mode: train on the first N examples (default: the split)."
    )
    flags.DEFINE_bool(
        "synthetic_data",
        False,
        "Epoch mode: random uint8 images of the data set's shape and training-set size instead "
        "of the real split (for machines without the data set; the timing does not depend on "
        "the pixels).",
    )
    flags.DEFINE_list("frameworks", ["jax", "pytorch"], "Which sides to run.")
    flags.DEFINE_string("output", None, "JSON path (default: experiments/results/bench_...)")
    flags.DEFINE_bool("readme", False, "Only rewrite the README table from the results.")
    flags.DEFINE_string("worker", None, "Internal: run one framework and print JSON.")
    flags.DEFINE_string("torch_device", None, "PyTorch device (default: cuda if present).")


FLAGS = flags.FLAGS
RESULTS = os.path.join(ROOT, "experiments", "results")
README = os.path.join(ROOT, "docs", "performance.md")  # holds the bench table


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarize(times: list[float], batch_size: int) -> dict:
    median = statistics.median(times)
    return {
        "step_ms_min": round(1000 * min(times), 1),
        "step_ms_median": round(1000 * median, 1),
        "img_per_sec_median": round(batch_size / median, 1),
        "img_per_sec_best": round(batch_size / min(times), 1),
        "repeats": len(times),
    }


# Training-set sizes, for --synthetic_data (which must not need the data set to find them).
TRAIN_EXAMPLES = {"cifar10": 50_000, "cifar100": 50_000, "fashion_mnist": 60_000}


def train_split(config):
    """The epoch mode's training images and labels (uint8 NHWC, int32): the config's real
    split, or with `--synthetic_data` random ones of its shape and size; then the first
    `--epoch_examples`."""
    import numpy as np

    from ffcl_jax import input_pipeline

    if FLAGS.synthetic_data:
        info = input_pipeline.dataset_info(config.dataset)
        count = config.get("train_examples") or TRAIN_EXAMPLES[config.dataset]
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (count, *info.image_shape), np.uint8)
        labels = rng.integers(0, info.num_classes, (count,), np.int32)
    else:
        images, labels = input_pipeline.load_split(config, "train")
    if FLAGS.epoch_examples:
        images, labels = images[: FLAGS.epoch_examples], labels[: FLAGS.epoch_examples]
    return images, labels


def step_on_random_batch(config, mesh):
    """`(jitted train step, fresh replicated state, one random batch of the config's shape)`: what
    step timings run (the state as if a long epoch had just begun, so the schedule is flat)."""
    import jax
    import numpy as np

    from ffcl_jax import input_pipeline, train

    settings = train.check_config(config, jax.device_count())
    info = input_pipeline.dataset_info(config.dataset)
    setup, state = train.build(config, settings, steps_per_epoch=1000)
    rng = np.random.default_rng(0)
    batch = mesh.global_batch(
        {
            "image": rng.integers(0, 256, (config.batch_size, *info.image_shape), np.uint8),
            "label": rng.integers(0, info.num_classes, (config.batch_size,), np.int32),
        }
    )
    step, _ = train.jit_steps(setup, config)
    return step, jax.device_put(state, mesh.replicated), batch


def jax_worker(config, modes) -> dict:
    import jax

    from ffcl_jax import parallel, train, xla_cpu

    # Before the first device query starts the backend (XLA reads XLA_FLAGS once).
    os.environ["XLA_FLAGS"] = xla_cpu.process_xla_flags(config, os.environ.get("XLA_FLAGS", ""))
    settings = train.check_config(config, jax.device_count())
    out = {
        "framework": "jax",
        "version": f"jax {jax.__version__}",
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": xla_cpu.compiler_options(config),
        "closed_form_batch_norm": xla_cpu.closed_form_batch_norm(config),
    }
    mesh = parallel.DataParallel()

    def fresh(steps_per_epoch):
        setup, state = train.build(config, settings, steps_per_epoch)
        return setup, jax.device_put(state, mesh.replicated)

    def memory(step_fn, state, batch) -> dict:
        analysis = step_fn.lower(state, batch).compile().memory_analysis()
        stats = jax.devices()[0].memory_stats() or {}
        return {
            "xla_temp_mb": round(analysis.temp_size_in_bytes / 2**20, 1),
            "xla_arguments_mb": round(analysis.argument_size_in_bytes / 2**20, 1),
            "device_peak_mb": (
                round(stats["peak_bytes_in_use"] / 2**20, 1)
                if "peak_bytes_in_use" in stats
                else None
            ),
        }

    if "step" in modes:
        step, state, batch = step_on_random_batch(config, mesh)
        rss_before = peak_rss_mb()
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        first = time.perf_counter() - start
        for _ in range(FLAGS.warmup - 1):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(FLAGS.repeats):
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        out["step"] = {
            **summarize(times, config.batch_size),
            "first_step_seconds_incl_compile": round(first, 2),
            "peak_rss_growth_mb": round(peak_rss_mb() - rss_before, 1),
            **memory(step, state, batch),
        }
    if "epoch" in modes:
        images, labels = train_split(config)
        data = train.make_train_data(config, images, labels, mesh)
        setup, state = fresh(data.steps_per_epoch)
        step, _ = train.jit_steps(setup, config)
        # Compile outside the timed epoch, on the epoch's first batch.
        warm = mesh.global_batch(next(iter(data.epoch(0))))
        jax.block_until_ready(step(jax.tree.map(lambda x: x.copy(), state), warm))
        start = time.perf_counter()
        for local in data.epoch(0):
            state, metrics = step(state, mesh.global_batch(local))
        jax.block_until_ready(state)
        seconds = time.perf_counter() - start
        out["epoch"] = {
            "examples": data.steps_per_epoch * config.batch_size,
            "steps": data.steps_per_epoch,
            "seconds": round(seconds, 2),
            "img_per_sec": round(data.steps_per_epoch * config.batch_size / seconds, 1),
        }
    return out


def torch_worker(config, modes) -> dict:
    import numpy as np
    import torch

    from ffcl_jax.torch_reference import train as reference

    device = FLAGS.torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    cuda = device.startswith("cuda")
    # What CIFAR training scripts set on a GPU: cuDNN picks its fastest convolution algorithms
    # in the first steps (untimed in step mode; part of the epoch in epoch mode, as for a user).
    torch.backends.cudnn.benchmark = cuda
    dtype = config.compute_dtype  # bfloat16: torch.autocast, float32 weights and losses

    def sync():
        if cuda:
            torch.cuda.synchronize()

    out = {
        "framework": "pytorch",
        "version": f"torch {torch.__version__}",
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu, {torch.get_num_threads()} threads",
        "compute": "torch.autocast bfloat16" if dtype == "bfloat16" else "float32",
    }
    if "step" in modes:
        cohort, optimizer, schedule, settings, info = reference.build(config, 1000, device)
        cohort.train()
        rng = np.random.default_rng(0)
        x, y = reference.as_tensors(
            rng.integers(0, 256, (config.batch_size, *info.image_shape), np.uint8),
            rng.integers(0, info.num_classes, (config.batch_size,), np.int32),
        )
        x, y = x.to(device), y.to(device)

        def step():
            reference.train_step(
                cohort, optimizer, schedule, x, y, settings, 0, info, device, dtype
            )
            sync()

        rss_before = peak_rss_mb()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        for _ in range(FLAGS.warmup - 1):
            step()
        times = []
        for _ in range(FLAGS.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        out["step"] = {
            **summarize(times, config.batch_size),
            "first_step_seconds": round(first, 2),
            "peak_rss_growth_mb": round(peak_rss_mb() - rss_before, 1),
            "device_peak_mb": (
                round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None
            ),
        }
    if "epoch" in modes:
        images, labels = train_split(config)
        steps = len(images) // config.batch_size
        cohort, optimizer, schedule, settings, info = reference.build(config, steps, device)
        cohort.train()
        images_nchw, labels_all = reference.as_tensors(images, labels)
        start = time.perf_counter()
        for x, y in reference.epoch_batches(images_nchw, labels_all, config, 0, steps):
            reference.train_step(
                cohort, optimizer, schedule, x, y, settings, 0, info, device, dtype
            )
        sync()
        seconds = time.perf_counter() - start
        out["epoch"] = {
            "examples": steps * config.batch_size,
            "steps": steps,
            "seconds": round(seconds, 2),
            "img_per_sec": round(steps * config.batch_size / seconds, 1),
        }
    return out


def cpu_isa(cpu_flags: set[str], arch: str) -> str:
    """The widest vector extension among the CPU's flags ("AVX-512", "AVX2"; else the
    architecture). It belongs in the machine description: this project's 2-core machines have
    come as AVX-512 and as AVX2 EPYCs of the same model name, whose step times differ 2x and
    whose fastest XLA:CPU setting differs too (README, Speed)."""
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")):
        if flag in cpu_flags:
            return name
    return arch


def machine() -> dict:
    cpu, cpu_flags = platform.processor() or "cpu", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    cpu = value.strip()
                elif key in ("flags", "Features"):  # x86, arm
                    cpu_flags = set(value.split())
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "isa": cpu_isa(cpu_flags, platform.machine()),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
    }


def run_worker(framework: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), f"--worker={framework}", *sys.argv[1:]]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"the {framework} benchmark failed (exit {done.returncode}); see above")
    return json.loads(lines[-1])


def result_name(config, device: str, synthetic: bool, isa: str = "") -> str:
    """One file per pair, batch, device (a CPU by its ISA) and setting."""
    flags_tag = "_xlaflags" if os.environ.get("XLA_FLAGS") else ""
    if config.get("xla_cpu_ynn_fusion", "auto") != "auto":
        flags_tag += f"_ynn_{config.xla_cpu_ynn_fusion}"
    if not config.get("xla_cpu_flatten_after_fusion", True):
        flags_tag += "_noflatten"
    if config.get("batch_norm_backward", "auto") != "auto":
        flags_tag += f"_bn_{config.batch_norm_backward}"
    if config.compute_dtype != "float32":
        flags_tag += f"_{config.compute_dtype}"
    if config.data_on_device:
        flags_tag += "_ondevice"
    if synthetic:
        flags_tag += "_synthetic"
    kind = "gpu" if "cpu" not in device.lower() else "cpu"
    if kind == "cpu" and isa:
        kind += "_" + isa.lower().replace("-", "")
    return f"bench_{config.teacher}_{config.student}_b{config.batch_size}_{kind}{flags_tag}"


def ynn_setting(compiler_options: dict | None) -> str:
    """The bench table's words for an XLA:CPU YNNPACK fusion list: "ynn eltwise+reduce"."""
    value = (compiler_options or {}).get("xla_cpu_experimental_ynn_fusion_type")
    if value is None:
        return "xla defaults"
    kinds = [kind.replace("LIBRARY_FUSION_TYPE_", "").lower() for kind in value.split(",") if kind]
    return "ynn " + "+".join(kinds) if kinds else "ynn off"


def write_readme() -> None:
    rows = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "bench_*.json"))):
        with open(path) as f:
            r = json.load(f)
        j, t = r.get("jax", {}), r.get("pytorch", {})
        for mode in ("step", "epoch"):
            if mode not in j and mode not in t:
                continue
            key = "img_per_sec_median" if mode == "step" else "img_per_sec"
            speeds = [f"{side[mode][key]:.0f}" if mode in side else "-" for side in (j, t)]
            ratio = r.get("ratio", {}).get(mode)
            device = (j or t)["device"]
            settings = [r.get("compute_dtype", "float32")]
            if "cpu" in device.lower():
                m = r["machine"]
                device = f"{m['cores']}-core {m['cpu']}" + (f" ({m['isa']})" if "isa" in m else "")
                settings.append(ynn_setting(j.get("compiler_options")))
                if "xla_cpu_flatten_after_fusion" in j.get("xla_flags", ""):
                    settings.append("flatten after fusion")
            if j.get("closed_form_batch_norm"):
                settings.append("closed-form BN backward")
            if mode == "epoch":
                settings.append("JAX data on device" if r.get("data_on_device") else "tf.data")
                if r.get("epoch_data") == "synthetic":
                    settings.append("synthetic images")
            setting = ", ".join(settings)
            rows.append(
                f"| {r['pair']} | {r['batch_size']} | {mode} | {device} | "
                f"{setting} | "
                f"{speeds[0]} | {speeds[1]} | "
                + (f"**{ratio:.2f}**" if ratio else "-")
                + f" | {r['date']} | `{r['command']}` |"
            )
    table = "\n".join(
        [
            "| pair | batch | mode | device | settings | JAX img/s | PyTorch img/s "
            "| JAX/PyTorch | date | command |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    readme_block.replace_block("bench", table, README)
    print(f"README table: {len(rows)} rows from {RESULTS}/bench_*.json")


def main(argv):
    del argv
    config = FLAGS.config
    modes = [m for m in FLAGS.modes if m in ("step", "epoch")]
    if FLAGS.worker:
        worker = jax_worker if FLAGS.worker == "jax" else torch_worker
        print(json.dumps(worker(config, modes)))
        return
    if FLAGS.readme:
        write_readme()
        return
    sides = {framework: run_worker(framework) for framework in FLAGS.frameworks}
    result = {
        "pair": f"{config.teacher}+{config.student}",
        "method": config.method,
        "dataset": config.dataset,
        "batch_size": config.batch_size,
        "compute_dtype": config.compute_dtype,
        "data_on_device": bool(config.data_on_device),
        "epoch_data": "synthetic" if FLAGS.synthetic_data else "real",
        "date": datetime.date.today().isoformat(),
        "command": "python experiments/bench_step.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        **sides,
    }
    if "jax" in sides and "pytorch" in sides:
        result["ratio"] = {}
        if "step" in modes:
            result["ratio"]["step"] = round(
                sides["jax"]["step"]["img_per_sec_median"]
                / sides["pytorch"]["step"]["img_per_sec_median"],
                3,
            )
        if "epoch" in modes:
            result["ratio"]["epoch"] = round(
                sides["jax"]["epoch"]["img_per_sec"] / sides["pytorch"]["epoch"]["img_per_sec"], 3
            )
    print(json.dumps(result, indent=1))
    device = sides.get("jax", sides.get("pytorch"))["device"]
    path = FLAGS.output or os.path.join(
        RESULTS,
        result_name(config, device, FLAGS.synthetic_data, result["machine"]["isa"]) + ".json",
    )
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
