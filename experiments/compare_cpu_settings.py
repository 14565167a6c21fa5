"""Which value of one config key makes the JAX train step fastest, timed interleaved.

    python experiments/compare_cpu_settings.py --config=configs/fashion_mnist.py \
        --settings=xla_default,dot,reduce,eltwise_reduce
    python experiments/compare_cpu_settings.py --config=configs/cifar100.py \
        --settings=eltwise,eltwise_reduce --rounds=8
    python experiments/compare_cpu_settings.py --config=configs/fashion_mnist.py \
        --key=loss.feat_form --settings=attention,fused_map,stage_fusion

`--key` is `xla_cpu_ynn_fusion` (XLA:CPU's YNNPACK fusion list) unless given; any key works, so
the cost of a loss setting (the feature forms above) is measured the same way. Values are read
as numbers where they parse as numbers.

Separate benchmark processes (bench_step.py) on a shared 2-core machine drift by 5-10% from one
run to the next, as much as the settings differ. This script compiles the step once per
setting in one process and then times them in turns (`--rounds` x `--steps_per_round` each),
so a drift hits every setting alike. It prints min and median milliseconds per step and each
median's speed-up over the first setting's. Nothing is written; docs/performance.md
quotes its output with the command. What only `XLA_FLAGS` can carry
(`config.xla_cpu_flatten_after_fusion`) is set once for the process, as the CLI sets it, and
holds for every setting alike; compare that one in alternating `bench_step.py` processes.
"""

from __future__ import annotations

import os
import statistics
import time

import bench_step  # experiments/, beside this script: the step timings' setup
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/fashion_mnist.py", "Config file.")
flags.DEFINE_string(
    "key", "xla_cpu_ynn_fusion", "The config key to vary (dotted for nested: loss.feat_form)."
)
flags.DEFINE_list("settings", ["xla_default", "auto"], "Values of --key; the first is the base.")
flags.DEFINE_integer("rounds", 10, "Turns over all settings.")
flags.DEFINE_integer("steps_per_round", 2, "Timed steps of one setting per turn.")
FLAGS = flags.FLAGS


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def main(argv):
    del argv
    import jax

    from ffcl_jax import parallel, xla_cpu

    os.environ["XLA_FLAGS"] = xla_cpu.process_xla_flags(
        FLAGS.config, os.environ.get("XLA_FLAGS", "")
    )  # as the CLI runs (process-wide, so for all)
    if FLAGS.key.startswith("xla_cpu") and jax.default_backend() != "cpu":
        raise SystemExit("these are XLA:CPU settings; run this on the CPU backend")
    mesh = parallel.DataParallel()
    runs = {}
    for setting in FLAGS.settings:
        config = FLAGS.config.copy_and_resolve_references()
        *parents, leaf = FLAGS.key.split(".")
        target = config
        for parent in parents:
            target = target[parent]
        target[leaf] = _value(setting)
        step, state, batch = bench_step.step_on_random_batch(config, mesh)
        for _ in range(2):  # compile, allocator warm-up
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        runs[setting] = {"step": step, "state": state, "batch": batch, "times": []}
        print(f"{setting}: {xla_cpu.compiler_options(config)}", flush=True)
    for _ in range(FLAGS.rounds):
        for run in runs.values():
            for _ in range(FLAGS.steps_per_round):
                start = time.perf_counter()
                run["state"], metrics = run["step"](run["state"], run["batch"])
                jax.block_until_ready(metrics)
                run["times"].append((time.perf_counter() - start) * 1e3)
    config = FLAGS.config
    print(
        f"\n{config.teacher} + {config.student}, batch {config.batch_size}, "
        f"{FLAGS.rounds} x {FLAGS.steps_per_round} steps each, interleaved; "
        f"XLA_FLAGS for all: {os.environ.get('XLA_FLAGS') or '(none)'}"
    )
    print(f"| {FLAGS.key} | min ms | median ms | speed-up |")
    print("|---|---|---|---|")
    base = statistics.median(next(iter(runs.values()))["times"])
    for setting, run in runs.items():
        median = statistics.median(run["times"])
        print(f"| {setting} | {min(run['times']):.0f} | {median:.0f} | {base / median:.2f}x |")


if __name__ == "__main__":
    app.run(main)
