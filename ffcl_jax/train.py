"""Training and evaluation of the cohort: what a run builds, and the loop.

The cohort is split once (`nnx.split`) into a static graph definition and two pytrees,
parameters and BatchNorm statistics; from then on everything is plain `jax.jit` over pytrees.
One jitted, donated step (`steps`) runs the forward pass of the whole cohort, every loss term,
the gradients, the SGD update and the BatchNorm statistics update, and returns a small metrics
dict. The host only synchronises at log steps and after evaluation.

The rest of a run lives beside this module: the config and its checks (`config_base`), the
optimizer and its schedule (`optimizer`), data parallelism (`parallel`), reporting (`report`), the
workdir, resume and preemption (`workdir`), checkpoints (`checkpoint`), and the XLA:CPU tuning the
CLI applies (`xla_cpu`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from ffcl_jax import (
    checkpoint,
    compilation_cache,
    datasets,
    input_pipeline,
    machine,
    methods,
    report,
    storage,
    xla_cpu,
)
from ffcl_jax import workdir as workdir_lib
from ffcl_jax.config_base import (
    COMPUTE_DTYPES,
    batch_norm_groups,
    check_config,
    eval_batch_size,
)
from ffcl_jax.errors import UserError
from ffcl_jax.methods import Method
from ffcl_jax.optimizer import make_optimizer
from ffcl_jax.parallel import DataParallel, small_batch_warning
from ffcl_jax.steps import (
    TrainState,
    create_train_state,
    loss_term_names,
    make_eval_step,
    make_forward,
    make_train_step,
)


def create_cohort(config, method: Method, info: datasets.DatasetInfo) -> methods.Cohort:
    """The method's members, created from `config.seed` in the method's order."""
    dtype = COMPUTE_DTYPES[config.compute_dtype]
    members = method.build_members(
        config, info.num_classes, info.image_shape[-1], dtype, nnx.Rngs(config.seed)
    )
    cohort = methods.Cohort(members)
    if config.compute_dtype == "float64":  # flax creates float32 variables whatever the dtype
        variables = nnx.state(cohort, (nnx.Param, nnx.BatchStat))
        nnx.update(cohort, jax.tree.map(lambda v: v.astype(jnp.float64), variables))
    return cohort


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run derives from its config before the first step (all static under `jit`)."""

    method: Method
    info: datasets.DatasetInfo
    graphdef: nnx.GraphDef
    schedule: optax.Schedule
    train_step: Callable  # pure (state, batch) -> (state, metrics); jit with donate_argnums=0
    # train_step with XLA's ops where it calls kernels XLA cannot count (report.train_flops)
    counted_train_step: Callable | None
    eval_step: Callable  # pure (params, batch_stats, batch, method_state) -> correct counts
    loss_terms: tuple[str, ...]  # the terms the method's objective computes, in its order
    onednn_kernels: bool  # float32 convolutions on ffcl_jax.cpu_kernels (config.cpu.kernels)
    platform: str  # what the steps are built for: "cpu", "gpu" or "tpu" (the mesh's devices)
    initial_weights_sha256: str  # report.weights_sha256 of the cohort as `config.seed` made it


def build(
    config, method: Method, steps_per_epoch: int, data_parallel: DataParallel | None = None
) -> tuple[Setup, TrainState]:
    """Cohort, optimizer, initial state and the two step functions, from a checked config.

    `data_parallel` is needed only for `config.batch_norm="per_device"` (the step then maps over
    its mesh); its devices' platform decides the backend-dependent choices (`xla_cpu`), so that a
    mesh of a TPU slice's compile-only devices (`compile_for`) gets the TPU's step. Without it,
    the steps are for one device of JAX's default backend.
    """
    info = datasets.dataset_info(config.dataset)
    tx, schedule = make_optimizer(config, steps_per_epoch, method)
    cohort = create_cohort(config, method, info)
    initial_weights_sha256 = report.weights_sha256(cohort)
    graphdef, state = create_train_state(cohort, tx, method)
    num_devices = data_parallel.size if data_parallel is not None else 1
    platform = data_parallel.platform if data_parallel is not None else jax.default_backend()
    kernels = xla_cpu.layer_kernels(config, num_devices, platform)
    per_device_mesh = None
    if config.batch_norm != "global":  # per_device, or groups:N of devices
        if data_parallel is None:
            raise ValueError(f"batch_norm={config.batch_norm!r} needs the data-parallel mesh")
        per_device_mesh = data_parallel.mesh

    def train_step(kernels):
        groups = batch_norm_groups(config.batch_norm, num_devices)
        return make_train_step(
            graphdef, tx, schedule, method, info, steps_per_epoch, per_device_mesh, kernels, groups
        )

    countable = xla_cpu.countable(kernels)
    setup = Setup(
        method=method,
        info=info,
        graphdef=graphdef,
        schedule=schedule,
        train_step=train_step(kernels),
        counted_train_step=train_step(countable) if countable != kernels else None,
        eval_step=make_eval_step(graphdef, method, info, kernels),
        loss_terms=loss_term_names(
            make_forward(graphdef, method, info), state, info, method.num_views
        ),
        onednn_kernels=kernels.conv2d is not None,
        platform=platform,
        initial_weights_sha256=initial_weights_sha256,
    )
    return setup, state


def jit_steps(setup: Setup, config) -> tuple[Callable, Callable]:
    """The jitted train step (state donated) and eval step, with XLA:CPU's compiler options
    when they are built for the CPU."""
    options = xla_cpu.compiler_options(config, setup.platform)
    return (
        jax.jit(setup.train_step, donate_argnums=0, compiler_options=options),
        jax.jit(setup.eval_step, compiler_options=options),
    )


def make_train_data(
    config,
    images,
    labels,
    data_parallel: DataParallel,
    num_views: int = 1,
    images_per_class: int = 0,
):
    """The training batches: tf.data on the host, or (`config.data_on_device`) made by jit;
    `num_views` augmentations of every image (`Method.num_views`), class-balanced batches of
    `images_per_class` images a class where it is > 0 (`Method.images_per_class`)."""
    if config.data_on_device:
        return input_pipeline.DeviceTrainData(
            config,
            images,
            labels,
            config.batch_size,
            data_parallel.data,
            data_parallel.replicated,
            num_views=num_views,
            images_per_class=images_per_class,
        )
    return input_pipeline.TrainData(
        config,
        images,
        labels,
        config.batch_size,
        jax.process_index(),
        jax.process_count(),
        num_views=num_views,
        images_per_class=images_per_class,
    )


def evaluate(
    eval_step, state: TrainState, data_parallel: DataParallel, images, labels, config
) -> dict:
    """Top-1 accuracy of every model over the whole split; each example counted exactly once."""
    local_batch = eval_batch_size(config, data_parallel.size) // jax.process_count()
    shards = np.array_split(np.arange(len(images)), jax.process_count())
    mine = shards[jax.process_index()]
    num_batches = -(-max(len(s) for s in shards) // local_batch)
    totals = None
    for batch in input_pipeline.eval_batches(images[mine], labels[mine], local_batch, num_batches):
        counts = eval_step(
            state.params, state.batch_stats, data_parallel.global_batch(batch), state.method_state
        )
        totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
    totals = jax.device_get(totals)
    count = float(totals.pop("count"))
    if int(count) != len(images):
        raise RuntimeError(f"evaluation counted {count} examples, expected {len(images)}")
    return {name: float(v) / count for name, v in totals.items()}


# --------------------------------------------------------------------------- the run


def new_progress() -> dict[str, Any]:
    """What a checkpoint records of the loop, so that a resumed run continues where it was."""
    return {
        "epoch": 0,  # completed epochs
        "batch_in_epoch": 0,  # batches of the next epoch already trained (preemption)
        "history": [],
        "best": None,
        "train_seconds": 0.0,
        "measured_steps": 0,
        "wall_seconds": 0.0,
        "first_step_seconds": None,
        "resumed_at_steps": [],
        "first_batch_sha256": None,  # report.batch_sha256 of this process's first batch
    }


def restore_or_initialize(config, method, state, data_parallel, checkpoints, resume_step, notes):
    """`(state, progress)`: from checkpoint `resume_step`, or the method's fresh start."""
    if resume_step is None:
        state, note = method.initial_state(state, config)
        notes += [note] if note else []
        return jax.device_put(state, data_parallel.replicated), new_progress()
    meta = checkpoints.read_meta(resume_step)
    checkpoints.check_config(resume_step, meta, config)
    state = checkpoints.restore_state(resume_step, jax.device_put(state, data_parallel.replicated))
    progress = meta["progress"]
    progress["resumed_at_steps"].append(resume_step)
    if progress["epoch"] >= config.num_epochs:
        notes.append(
            f"the run in {checkpoints.directory} had already finished its {progress['epoch']} "
            "epochs: raise --config.num_epochs to train longer, or pass --fresh"
        )
    batch = f", batch {progress['batch_in_epoch']}" if progress["batch_in_epoch"] else ""
    notes.append(
        f"resumed from checkpoint step {resume_step} (epoch {progress['epoch']}{batch}) in "
        f"{checkpoints.directory}"
    )
    return state, progress


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False, command: str = ""
) -> dict[str, Any]:
    """Trains the cohort for `config.num_epochs`, evaluating every `eval_every_epochs` (on the
    validation split when there is one, then, with `config.final_test`, the test split once at
    the end).

    Writes to `workdir`: `config.json`, `metrics.jsonl` (train rows at log steps, one eval row
    per evaluation), TensorBoard events, `checkpoints/`, `results.json` and `curves.png`.
    Resumes from the latest checkpoint there, if any; `fresh=True` first moves an earlier run to
    `previous_runs/`. `command` is recorded in `results.json` as what made the run. Returns the
    results.
    """
    workdir = storage.path(workdir)
    data_parallel = DataParallel(config.mesh.data)
    method = check_config(config, data_parallel.size)
    is_chief = jax.process_index() == 0
    (train_images, train_labels), splits = datasets.load_splits(config)
    eval_split = "validation" if "validation" in splits else "test"
    num_classes = datasets.dataset_info(config.dataset).num_classes
    train_data = make_train_data(
        config,
        train_images,
        train_labels,
        data_parallel,
        method.num_views,
        method.images_per_class(config, num_classes),
    )
    spe, total_steps = train_data.steps_per_epoch, config.num_epochs * train_data.steps_per_epoch
    setup, state = build(config, method, spe, data_parallel)
    checkpoints, resume_step, moved = workdir_lib.start_or_resume(workdir, config, fresh, is_chief)
    watch = workdir_lib.PreemptionWatch(checkpoints)
    notes = [f"moved the earlier run to {moved}"] if moved else []
    fallback = xla_cpu.onednn_fallback_note(config, data_parallel.size)
    notes += [fallback] if fallback else []
    notes.append(compilation_cache.describe())
    few_images = small_batch_warning(config.batch_size, data_parallel.size, data_parallel.platform)
    notes += [few_images] if few_images else []
    compiled = compilation_cache.Counter()  # what this run loads from JAX's cache, or writes
    log = None
    try:
        with jax.set_mesh(data_parallel.mesh):
            state, progress = restore_or_initialize(
                config, method, state, data_parallel, checkpoints, resume_step, notes
            )
            train_step, eval_step = jit_steps(setup, config)
            if is_chief:
                if resume_step is not None:
                    checkpoint.truncate_metrics_log(workdir / "metrics.jsonl", resume_step)
                storage.write_text(
                    workdir / "config.json", checkpoint.config_as_run(config, method)
                )
            log = report.RunLog(
                workdir, is_chief, config.num_epochs, total_steps, config.tensorboard_dir
            )
            log.print(
                report.banner(
                    config,
                    setup,
                    state.params,
                    len(train_images),
                    splits,
                    spe,
                    data_parallel.size,
                )
            )
            log.print(report.settings_line(method))
            for note in notes:
                log.print(note)
            step = int(jax.device_get(state.step))
            if step != progress["epoch"] * spe + progress["batch_in_epoch"]:
                raise UserError(
                    f"checkpoint step {step} does not match its epoch {progress['epoch']} x {spe} "
                    f"steps + {progress['batch_in_epoch']} (was batch_size or the data set "
                    "changed?); use a new --workdir or pass --fresh (nothing was deleted)"
                )
            last_checkpoint = f"step {resume_step}" if resume_step is not None else None
            clock = report.StepClock(progress, config.batch_size, total_steps)

            def save(epoch_done: int, batch_in_epoch: int, eval_row: dict | None) -> None:
                nonlocal last_checkpoint
                clock.add_wall_time()
                progress.update(epoch=epoch_done, batch_in_epoch=batch_in_epoch)
                metrics = eval_row and {k: eval_row[k] for k in report.models_in(eval_row)}
                meta = {"config": json.loads(config.to_json_best_effort()), "progress": progress}
                checkpoints.save(step, state, meta, metrics)
                last_checkpoint = f"step {step}"

            def evaluate_split(split: str, epoch_done: int) -> dict:
                """Top-1 of every model on `split`, as a logged eval row."""
                started = time.time()
                accuracy = evaluate(eval_step, state, data_parallel, *splits[split], config)
                accuracy = report.in_order(accuracy, method.evaluated_names())
                row = {"epoch": epoch_done, "step": step, "split": split, **accuracy}
                log.eval(row, time.time() - started)
                return row

            def stop_preempted(when: str) -> None:
                checkpoints.wait()
                raise workdir_lib.Preempted(
                    f"preempted {when}: checkpoint step {step} is in {checkpoints.directory}; "
                    "run the same command again to resume"
                )

            start_epoch, skip = progress["epoch"], progress["batch_in_epoch"]
            preempted = False
            for epoch in range(start_epoch, config.num_epochs):
                pending: list[dict] = []
                batch_in_epoch = skip if epoch == start_epoch else 0
                clock.start_interval(step)
                for local_batch in train_data.epoch(epoch, skip_batches=batch_in_epoch):
                    if step == 0:
                        progress["first_batch_sha256"] = report.batch_sha256(
                            local_batch["image"], local_batch["label"]
                        )
                    state, metrics = train_step(state, data_parallel.global_batch(local_batch))
                    step, batch_in_epoch = step + 1, batch_in_epoch + 1
                    pending.append(metrics)
                    clock.count_step(metrics, log)  # the first step of a session compiles
                    preempted = watch.reached(step)
                    if step % config.log_every_steps == 0 or batch_in_epoch == spe or preempted:
                        summary = report.summarize_interval(
                            pending, clock.interval_first, workdir, last_checkpoint
                        )
                        log.train(step, epoch + 1, summary, *clock.end_interval(step))
                        pending = []
                    if preempted and batch_in_epoch < spe:
                        save(epoch, batch_in_epoch, None)
                        stop_preempted(f"at step {step}")
                is_last = epoch + 1 == config.num_epochs
                row = None
                if (epoch + 1) % config.eval_every_epochs == 0 or is_last:
                    row = evaluate_split(eval_split, epoch + 1)
                    progress["history"].append(row)
                new_best = report.update_best(progress, row, config.best_metric)
                if (epoch + 1) % config.checkpoint_every_epochs == 0 or is_last or new_best:
                    save(epoch + 1, 0, row)
                if preempted and not is_last:  # the notice came with the epoch's last step
                    stop_preempted(f"after epoch {epoch + 1}")
            checkpoints.wait()
            final_test = None
            if eval_split != "test" and config.final_test:  # once, after training
                final_test = evaluate_split("test", config.num_epochs)
            clock.add_wall_time()
            results = report.results(config, setup, state.params, progress, eval_split)
            results.update(final_test=final_test, command=command)
            results["xla_compiler_options"] = xla_cpu.compiler_options(config)
            results["closed_form_batch_norm"] = xla_cpu.closed_form_batch_norm(config)
            results["onednn_kernels"] = setup.onednn_kernels
            results["compilation_cache"] = compiled.summary()
            results["machine"] = machine.machine()
            results["initial_weights_sha256"] = setup.initial_weights_sha256
            results["first_batch_sha256"] = progress.get("first_batch_sha256")
            results["train_flops_per_step"] = report.train_flops(setup, state, config.batch_size)
            if is_chief:
                report.write_outputs(workdir, config, results, log)
            return results
    finally:
        compiled.close()
        if log is not None:
            log.close()
        watch.close()
        checkpoints.wait()  # a save in flight completes: the last good checkpoint stays
        checkpoints.close()
