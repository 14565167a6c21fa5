"""JAX against the PyTorch reference: the cohort's train step and a training epoch, same run.

    python experiments/bench_step.py --config=configs/fashion_mnist.py            # demo pair
    python experiments/bench_step.py --config=configs/cifar100.py --modes=step     # default pair
    python experiments/bench_step.py --readme      # rewrite docs/performance.md's tables
    python experiments/bench_step.py --modes=compare --settings=xla_default,reduce   # JAX alone
    python experiments/bench_step.py --modes=checkpoint --config=configs/cifar100.py --repeats=3

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

Four modes time JAX (`primitives` PyTorch too) and print their result (`--output=FILE`
writes `compare`'s, `profile`'s and `primitives`' as JSON, with the command and every timed
step, for a result to commit):
- `compare`: the train step under several values of one config key (`--key`, default
  `cpu.ynn_fusion`, XLA:CPU's YNNPACK fusion list; any key works, e.g.
  `--key=loss.feat_form --settings=attention,fused_map,stage_fusion` for a loss setting's cost).
  Separate benchmark processes on a shared 2-core machine drift by 5-10% from one run to the
  next, as much as such settings differ, so the step is compiled once per setting in one
  process and the settings are timed in turns (`--rounds` x `--steps_per_round` each): a drift
  hits all alike. Prints a Markdown table of min and median ms and each median's speed-up over
  the first setting. What only `XLA_FLAGS` carries (`cpu.flatten_after_fusion`) holds for
  the whole process, so compare it in alternating `--modes=step` processes instead. Two keys
  vary the oneDNN kernels rather than the config: `--key=cpu_kernels.thread
  --settings=kernel_thread,caller` (where their work runs) and `--key=cpu_kernels.residual_end
  --settings=fused,separate` (a residual block's add and ReLU in the BatchNorm kernel, or XLA's).
  `--key=cpu.malloc --settings=retain,hugepages,system` (glibc reads it at start-up) runs a JAX
  step worker (`--repeats` steps) per setting in turns instead, with page faults and system
  seconds a step beside the times.
- `profile`: the ops one train step spends its time in, from a profiler trace, by kind and one
  by one (`--top`). Tracing slows the call (a step's kernels and fusions each record events):
  read the shares, and time with the other modes.
- `primitives`: every oneDNN primitive `--repeats` train steps run, as oneDNN's own verbose mode
  times it: which implementation each convolution pass gets, its ms a step and GFLOP/s, and
  their sum beside the step's wall time; for JAX (its oneDNN kernels on) and, in a worker
  process, PyTorch (whose CPU convolutions are oneDNN's too).
- `checkpoint`: saves the config's initial cohort state (no data needed) as training does,
  `--repeats` times, timing the part that blocks the loop and the time until the checkpoint is
  complete, then restores it; prints one JSON line with the medians and the size
  (`--checkpoint_dir`, default a temporary folder, may be any path orbax writes, gs:// too).

Each framework runs in its own subprocess, one after the other (never both at once): their
thread pools would fight over the cores, and each process's peak memory is then its own.
A shared machine drifts by 10-40% over minutes, so `--turns=N` alternates the two workers N
times (JAX, PyTorch, JAX, ...): the ratio is the median of the turns' ratios, each turn's is
kept under `turns`, and the sides shown are those of the turn with the median ratio.
Peak memory is the process's peak resident set growth over the set-up on a CPU, the allocator's
peak on a GPU; XLA's own buffer plan (`memory_analysis`) is reported beside it.

Results: one JSON per (config, batch size, device, XLA setting) in `experiments/results/`
(`bench_<name>.json`, with the machine description and the command), and `--readme` rewrites
the table between the `bench:start` / `bench:end` markers of docs/performance.md from all of
them.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import bench_results  # experiments/, beside this script
import primitive_times
import step_probes
from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: `experiments` and `ffcl_jax` from the repo root
    sys.path.insert(0, ROOT)


def define_flags() -> None:
    """Flags exist only when this file runs as a script: importing it (tests do) next to
    `ffcl_jax.main`, which defines `--config` too, must not clash."""
    config_flags.DEFINE_config_file("config", "configs/fashion_mnist.py", "Config file.")
    flags.DEFINE_list(
        "modes",
        ["step", "epoch"],
        "step and/or epoch; or compare, checkpoint, profile, primitives.",
    )
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
    flags.DEFINE_integer("turns", 1, "Step/epoch: alternate the framework workers this often.")
    flags.DEFINE_string("output", None, "JSON path (default: experiments/results/bench_...)")
    flags.DEFINE_bool(
        "readme", False, "Only rewrite docs/performance.md's tables from the results."
    )
    flags.DEFINE_string("worker", None, "Internal: run one framework and print JSON.")
    flags.DEFINE_string("torch_device", None, "PyTorch device (default: cuda if present).")
    flags.DEFINE_string("key", "cpu.ynn_fusion", "compare: the config key (dotted if nested).")
    flags.DEFINE_list("settings", ["xla_default", "auto"], "compare: values; the first: base.")
    flags.DEFINE_integer("rounds", 10, "compare: turns over all settings.")
    flags.DEFINE_integer("steps_per_round", 2, "compare: timed steps of one setting per turn.")
    flags.DEFINE_string("checkpoint_dir", None, "checkpoint: where to save (default: a temp dir).")
    flags.DEFINE_integer("top", 25, "profile: how many ops to list.")


FLAGS = flags.FLAGS


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# Training-set sizes, for --synthetic_data (which must not need the data set to find them).
TRAIN_EXAMPLES = {"cifar10": 50_000, "cifar100": 50_000, "fashion_mnist": 60_000}


def train_split(config):
    """The epoch mode's training images and labels (uint8 NHWC, int32): the config's real
    split, or with `--synthetic_data` random ones of its shape and size; then the first
    `--epoch_examples`."""
    import numpy as np

    from ffcl_jax import datasets

    if FLAGS.synthetic_data:
        info = datasets.dataset_info(config.dataset)
        count = config.get("train_examples") or TRAIN_EXAMPLES[config.dataset]
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (count, *info.image_shape), np.uint8)
        labels = rng.integers(0, info.num_classes, (count,), np.int32)
    else:
        images, labels = datasets.load_split(config, "train")
    if FLAGS.epoch_examples:
        images, labels = images[: FLAGS.epoch_examples], labels[: FLAGS.epoch_examples]
    return images, labels


def jax_worker(config, modes) -> dict:
    import jax
    import jax.numpy as jnp

    from ffcl_jax import cpu_kernels, parallel, process_env, train, xla_cpu

    # Before the first device query starts the backend (XLA reads XLA_FLAGS once).
    os.environ["XLA_FLAGS"] = xla_cpu.process_xla_flags(config, os.environ.get("XLA_FLAGS", ""))
    settings = train.check_config(config, jax.device_count())
    onednn = xla_cpu.use_onednn_kernels(config, jax.device_count())
    out = {
        "framework": "jax",
        "version": f"jax {jax.__version__}",
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": xla_cpu.compiler_options(config),
        "closed_form_batch_norm": xla_cpu.closed_form_batch_norm(config),
        "onednn_kernels": onednn,
        "cpu_kernel_ops": list(cpu_kernels.OPS) if onednn else [],
        "glibc_tunables": process_env.tunables_in_effect(os.environ.get("GLIBC_TUNABLES", "")),
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
        step, state, batch = step_probes.step_on_random_batch(config, mesh)
        rss_before = peak_rss_mb()
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        first = time.perf_counter() - start
        for _ in range(FLAGS.warmup - 1):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times = []
        usage = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(FLAGS.repeats):
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        out["step"] = {
            **bench_results.summarize(times, config.batch_size),
            **bench_results.timed_steps(usage, resource.getrusage(resource.RUSAGE_SELF), times),
            "first_step_seconds_incl_compile": round(first, 2),
            "peak_rss_growth_mb": round(peak_rss_mb() - rss_before, 1),
            **memory(step, state, batch),
            "train_gflop_per_step": round(step_probes.train_flops_per_step(config) / 1e9, 3),
        }
        if jax.default_backend() == "cpu":
            out["gemm_gflops"] = step_probes.gemm_gflops(
                lambda a, b: jax.block_until_ready(jnp.dot(a, b)),
                lambda n: jax.random.normal(jax.random.key(n), (n, n), jnp.float32),
            )
    if "epoch" in modes:
        images, labels = train_split(config)
        data = train.make_train_data(config, images, labels, mesh, settings.num_views)
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


def time_checkpoint(config) -> dict:
    """`checkpoint` mode (see the module docstring)."""
    import tempfile

    import jax

    from ffcl_jax import checkpoint, parallel, storage, train

    mesh = parallel.DataParallel(config.mesh.data)
    _, state = train.build(config, train.check_config(config, mesh.size), steps_per_epoch=1000)
    state = jax.device_put(state, mesh.replicated)
    blocked, complete, restore = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        checkpoints = checkpoint.RunCheckpoints(FLAGS.checkpoint_dir or scratch, config)
        meta = {"config": json.loads(config.to_json_best_effort()), "progress": {}}
        for step in range(1, FLAGS.repeats + 1):
            start = time.perf_counter()
            checkpoints.save(step, state, meta)
            blocked.append(time.perf_counter() - start)
            checkpoints.wait()
            complete.append(time.perf_counter() - start)
            start = time.perf_counter()
            jax.block_until_ready(checkpoints.restore_state(step, state))
            restore.append(time.perf_counter() - start)
        size = storage.tree_size(storage.path(checkpoints.directory) / str(FLAGS.repeats))
        checkpoints.close()
    return {
        "pair": f"{config.teacher}+{config.student}",
        "method": config.method,
        "parameters": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "machine": bench_results.machine(),
        "command": "python experiments/bench_step.py " + " ".join(sys.argv[1:]),
        "save_blocking_s_median": round(statistics.median(blocked), 3),
        "save_complete_s_median": round(statistics.median(complete), 3),
        "restore_s_median": round(statistics.median(restore), 3),
        "checkpoint_mb": round(size / 2**20, 2),
    }


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
        temporal_mean = reference.temporal_mean_of(cohort, settings)
        cohort.train()
        rng = np.random.default_rng(0)
        num_views = settings["num_views"]
        views = (num_views,) if num_views > 1 else ()
        x, y = reference.as_tensors(
            rng.integers(0, 256, (config.batch_size, *views, *info.image_shape), np.uint8),
            rng.integers(0, info.num_classes, (config.batch_size,), np.int32),
        )
        x, y = x.to(device), y.to(device)

        def step():
            reference.train_step(
                cohort, optimizer, schedule, x, y, settings, 0, info, device, dtype, temporal_mean
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
        usage = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(FLAGS.repeats):
            if os.environ.get("ONEDNN_VERBOSE"):  # primitives mode: where a step's lines begin
                print(primitive_times.STEP_MARKER, flush=True)
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        costs = bench_results.timed_steps(usage, resource.getrusage(resource.RUSAGE_SELF), times)
        if not cuda:
            out["gemm_gflops"] = step_probes.gemm_gflops(
                torch.mm, lambda n: torch.randn(n, n, generator=torch.Generator().manual_seed(n))
            )
        out["step"] = {
            **bench_results.summarize(times, config.batch_size),
            **costs,
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
        temporal_mean = reference.temporal_mean_of(cohort, settings)
        cohort.train()
        images_nchw, labels_all = reference.as_tensors(images, labels)
        start = time.perf_counter()
        batches = reference.epoch_batches(
            images_nchw, labels_all, config, 0, steps, settings["num_views"]
        )
        for x, y in batches:
            reference.train_step(
                cohort, optimizer, schedule, x, y, settings, 0, info, device, dtype, temporal_mean
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


def run_worker(framework: str, env: dict | None = None, *flags_after: str) -> dict:
    """Runs one framework's worker on this command line (`flags_after` override it)."""
    me = os.path.abspath(__file__)
    argv = [sys.executable, me, f"--worker={framework}", *sys.argv[1:], *flags_after]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"the {framework} benchmark failed (exit {done.returncode}); see above")
    return json.loads(lines[-1])


def main(argv):
    del argv
    config = FLAGS.config
    modes = [m for m in FLAGS.modes if m in ("step", "epoch")]
    if FLAGS.worker:
        worker = jax_worker if FLAGS.worker == "jax" else torch_worker
        print(json.dumps(worker(config, modes)))
        return
    if FLAGS.readme:
        bench_results.write_readme()
        bench_results.write_compile_for_table()
        bench_results.write_pod_scaling_table()
        return
    if "compare" in FLAGS.modes and FLAGS.key == step_probes.MALLOC:  # a process's setting
        record = step_probes.compare_mallocs(config, FLAGS.settings, FLAGS.rounds, run_worker)
        print(record["table"])
        if FLAGS.output:
            bench_results.write_record(FLAGS.output, record, sys.argv[1:])
        return
    if {"compare", "checkpoint", "profile", "primitives"} & set(FLAGS.modes):  # in this process
        from ffcl_jax import xla_cpu

        os.environ["XLA_FLAGS"] = xla_cpu.process_xla_flags(config, os.environ.get("XLA_FLAGS", ""))
        if "compare" in FLAGS.modes:
            record = step_probes.compare_settings(
                config,
                FLAGS.key,
                FLAGS.settings,
                warmup=FLAGS.warmup,
                rounds=FLAGS.rounds,
                steps_per_round=FLAGS.steps_per_round,
            )
        elif "profile" in FLAGS.modes:
            record = step_probes.profile_step(config, FLAGS.top)
        elif "primitives" in FLAGS.modes:
            record = primitive_times.primitive_times(
                config, FLAGS.frameworks, FLAGS.repeats, FLAGS.warmup, sys.argv[1:]
            )
        else:
            print(json.dumps(time_checkpoint(config)))
            return
        print(record["table"])
        if FLAGS.output:  # a measurement to commit: its command and date with it
            bench_results.write_record(FLAGS.output, record, sys.argv[1:])
        return
    turns = [
        {framework: run_worker(framework) for framework in FLAGS.frameworks}
        for _ in range(FLAGS.turns)
    ]
    ratios = [bench_results.pair_ratios(sides, modes) for sides in turns]
    median_turn = bench_results.median_turn(ratios)
    sides = turns[median_turn]
    from ffcl_jax.process_env import tunables_in_effect

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
        "machine": bench_results.machine(),
        "glibc_tunables": tunables_in_effect(os.environ.get("GLIBC_TUNABLES", "")),
        **sides,
    }
    peak = bench_results.fraction_of_peak(sides)
    if peak:
        result["fp32_peak"] = peak
    if ratios[0]:
        result["ratio"] = {
            mode: round(statistics.median(r[mode] for r in ratios), 3) for mode in ratios[0]
        }
    if FLAGS.turns > 1:
        result["turns"] = [{**sides, "ratio": r} for sides, r in zip(turns, ratios, strict=True)]
    print(json.dumps(result, indent=1))
    device = sides.get("jax", sides.get("pytorch"))["device"]
    path = FLAGS.output or os.path.join(
        bench_results.RESULTS,
        bench_results.result_name(config, device, FLAGS.synthetic_data, result["machine"]["isa"])
        + ".json",
    )
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    from ffcl_jax import process_env

    # As the CLI runs (both frameworks' workers inherit it): malloc as `$FFCL_MALLOC` says.
    env = process_env.with_malloc(dict(os.environ))
    if env is not None:
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    define_flags()
    app.run(main)
