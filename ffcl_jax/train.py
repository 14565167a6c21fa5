"""Training and evaluation of the teacher/student/fusion cohort.

The cohort is split once (`nnx.split`) into a static graph definition and two pytrees,
parameters and BatchNorm statistics; from then on everything is plain `jax.jit` over pytrees.
One jitted, donated step runs the forward pass of both networks and the fusion module, every loss
term, the gradients, the SGD update and the BatchNorm statistics update, and returns a small
metrics dict. The host only synchronises at log steps and after evaluation.

Data parallelism: the batch is a global array sharded over the `data` axis of a device mesh and
the state is replicated; under `jit` the BatchNorm statistics are computed over the *global*
batch (SyncBN semantics).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ffcl_jax import input_pipeline, losses, models, report
from ffcl_jax.errors import UserError
from ffcl_jax.methods import (
    LossSettings,
    check_feature_stages,
    cohort_objective,
    resolve_loss_settings,
)

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EVAL_MODELS = ("student", "teacher", "fused", "ensemble")


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState


# --------------------------------------------------------------------------- setup


def check_config(config: ml_collections.ConfigDict, num_devices: int) -> LossSettings:
    """Validates what can be checked before any data is read; returns the loss settings."""
    input_pipeline.dataset_info(config.dataset)
    models.check_model_name(config.teacher)
    models.check_model_name(config.student)
    settings = resolve_loss_settings(config.method, dict(config.loss))
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise UserError(
            f"unknown compute_dtype {config.compute_dtype!r}; valid: {', '.join(COMPUTE_DTYPES)}"
        )
    for key in ("batch_size", "eval_batch_size"):
        value = config[key]
        if value <= 0 or value % num_devices:
            raise UserError(
                f"config.{key}={value} must be a positive multiple of the {num_devices} devices "
                "it is split over"
            )
    if config.num_epochs <= 0:
        raise UserError(f"config.num_epochs must be > 0, got {config.num_epochs}")
    if config.learning_rate <= 0:
        raise UserError(f"config.learning_rate must be > 0, got {config.learning_rate}")
    decay_epochs = list(config.lr_decay_epochs)
    if any(b <= a for a, b in zip(decay_epochs, decay_epochs[1:], strict=False)):
        raise UserError(
            f"config.lr_decay_epochs must be strictly increasing, got {config.lr_decay_epochs}"
        )
    for key in ("log_every_steps", "eval_every_epochs"):
        if config[key] <= 0:
            raise UserError(f"config.{key} must be > 0, got {config[key]}")
    return settings


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """SGD (Nesterov) with per-role weight decay and an epoch-based multistep schedule.

    Weight decay is added to the gradient before momentum, as `torch.optim.SGD(weight_decay=...)`
    does, and applies to every parameter of a role (BatchNorm included), as in the FFL and
    RepDistiller references: `weight_decay` for teacher and student, `fusion_weight_decay` for
    the fusion module.
    """
    schedule = optax.piecewise_constant_schedule(
        config.learning_rate,
        {int(epoch * steps_per_epoch): config.lr_decay_factor for epoch in config.lr_decay_epochs},
    )

    def role_mask(predicate: Callable[[str], bool]):
        return lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: predicate(path[0].key), params
        )

    tx = optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=role_mask(lambda r: r != "fusion")),
        optax.add_decayed_weights(
            config.fusion_weight_decay, mask=role_mask(lambda r: r == "fusion")
        ),
        optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
    )
    return tx, schedule


def create_cohort(config, settings: LossSettings, info: input_pipeline.DatasetInfo):
    cohort = models.create_cohort(
        config.teacher,
        config.student,
        info.num_classes,
        in_channels=info.image_shape[-1],
        use_fusion=settings.use_fusion,
        fused_channels=config.fusion_channels,
        dtype=COMPUTE_DTYPES[config.compute_dtype],
        seed=config.seed,
    )
    check_feature_stages(
        settings, len(cohort.teacher.stage_channels), len(cohort.student.stage_channels)
    )
    return cohort


def create_train_state(cohort: nnx.Module, tx) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, batch_stats = nnx.split(cohort, nnx.Param, nnx.BatchStat)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
    )
    return graphdef, state


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run derives from its config before the first step (all static under `jit`)."""

    settings: LossSettings
    info: input_pipeline.DatasetInfo
    graphdef: nnx.GraphDef
    schedule: optax.Schedule
    train_step: Callable  # pure (state, batch) -> (state, metrics); jit with donate_argnums=0
    eval_step: Callable  # pure (params, batch_stats, batch) -> correct counts


def build(config, settings: LossSettings, steps_per_epoch: int) -> tuple[Setup, TrainState]:
    """Cohort, optimizer, initial state and the two step functions, from a checked config."""
    info = input_pipeline.dataset_info(config.dataset)
    tx, schedule = make_optimizer(config, steps_per_epoch)
    graphdef, state = create_train_state(create_cohort(config, settings, info), tx)
    setup = Setup(
        settings=settings,
        info=info,
        graphdef=graphdef,
        schedule=schedule,
        train_step=make_train_step(graphdef, tx, schedule, settings, info, steps_per_epoch),
        eval_step=make_eval_step(graphdef, info),
    )
    return setup, state


# --------------------------------------------------------------------------- steps


def make_train_step(
    graphdef: nnx.GraphDef,
    tx,
    schedule,
    settings: LossSettings,
    info: input_pipeline.DatasetInfo,
    steps_per_epoch: int,
):
    """The whole cohort update as one pure function `(state, batch) -> (state, metrics)`."""

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        images = input_pipeline.normalize(batch["image"], info)
        labels = batch["label"]
        # Epoch-wise quantities (ramp-up weight) derive from the step inside the graph, so the
        # step never retraces and needs no host input.
        epoch = state.step // steps_per_epoch

        def loss_fn(params):
            # copy=True: fresh Variables owned by this (grad) trace, so BatchNorm may update them.
            cohort = nnx.merge(graphdef, params, state.batch_stats, copy=True)
            outputs = cohort(images, train=True)
            total, terms = cohort_objective(outputs, labels, settings, epoch, info.num_classes)
            new_batch_stats = nnx.state(cohort, nnx.BatchStat)
            logits = {
                k: outputs[f"{k}_logits"]
                for k in ("teacher", "student", "fused")
                if f"{k}_logits" in outputs
            }
            return total, (terms, logits, new_batch_stats)

        (total, (terms, logits, new_batch_stats)), grads = jax.value_and_grad(
            loss_fn, has_aux=True
        )(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": total, **terms, "learning_rate": schedule(state.step)}
        for name, z in logits.items():
            metrics[f"train_acc_{name}"] = losses.top1_correct(z, labels).mean()
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=new_batch_stats, opt_state=opt_state
        )
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, info: input_pipeline.DatasetInfo):
    """`(params, batch_stats, batch) -> correct counts` of T, S, fused and the T+S ensemble."""

    def eval_step(params, batch_stats, batch):
        cohort = nnx.merge(graphdef, params, batch_stats)
        outputs = cohort(input_pipeline.normalize(batch["image"], info), train=False)
        labels, mask = batch["label"], batch["mask"]
        logits = {
            "teacher": outputs["teacher_logits"],
            "student": outputs["student_logits"],
            "ensemble": losses.ensemble_logits(
                outputs["teacher_logits"], outputs["student_logits"]
            ),
        }
        if "fused_logits" in outputs:
            logits["fused"] = outputs["fused_logits"]
        counts = {k: jnp.sum(losses.top1_correct(z, labels) * mask) for k, z in logits.items()}
        counts["count"] = jnp.sum(mask)
        return counts

    return eval_step


# --------------------------------------------------------------------------- helpers


class Mesh:
    """A 1-D data-parallel mesh over every device, with the two shardings the loop needs."""

    def __init__(self):
        self.mesh = jax.make_mesh((jax.device_count(),), ("data",))
        self.data = NamedSharding(self.mesh, P("data"))
        self.replicated = NamedSharding(self.mesh, P())

    def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assembles every process's local batch into one array sharded over `data`."""
        return {
            k: jax.make_array_from_process_local_data(self.data, v) for k, v in local_batch.items()
        }


def evaluate(eval_step, state: TrainState, mesh: Mesh, images, labels, config) -> dict:
    """Top-1 accuracy of every model over the whole split; each example counted exactly once."""
    local_batch = config.eval_batch_size // jax.process_count()
    shards = np.array_split(np.arange(len(images)), jax.process_count())
    mine = shards[jax.process_index()]
    num_batches = -(-max(len(s) for s in shards) // local_batch)
    totals = None
    for batch in input_pipeline.eval_batches(images[mine], labels[mine], local_batch, num_batches):
        counts = eval_step(state.params, state.batch_stats, mesh.global_batch(batch))
        totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
    totals = jax.device_get(totals)
    count = float(totals.pop("count"))
    if int(count) != len(images):
        raise RuntimeError(f"evaluation counted {count} examples, expected {len(images)}")
    return {name: float(v) / count for name, v in totals.items()}


def _format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rem = divmod(seconds, 3600)
    minutes, secs = divmod(rem, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
    fetched = jax.device_get(pending)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def _check_finite(metrics: dict[str, float], step: int, workdir: str) -> None:
    if not np.isfinite(metrics["loss"]):
        terms = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "learning_rate")
        raise UserError(
            f"non-finite loss at step {step} ({terms}); lower config.learning_rate or use "
            f"compute_dtype=float32; logs so far are kept in {workdir}"
        )


class RunLog:
    """Where a run reports: the console, `metrics.jsonl` and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool, num_epochs: int, total_steps: int):
        self.enabled = enabled
        self.num_epochs, self.total_steps = num_epochs, total_steps
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.writer = None
        if enabled:
            from clu import metric_writers

            self.writer = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def _jsonl(self, **row) -> None:
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def train(
        self, step: int, epoch: int, summary: dict, img_per_sec: float, eta_seconds: float
    ) -> None:
        if not self.enabled:
            return
        accuracies = " ".join(
            f"{name[0].upper()} {summary[f'train_acc_{name}']:.3f}"
            for name in ("teacher", "student", "fused")
            if f"train_acc_{name}" in summary
        )
        self.print(
            f"epoch {epoch}/{self.num_epochs} step {step}/{self.total_steps} | "
            f"loss {summary['loss']:.4f} | "
            f"train acc {accuracies} | {img_per_sec:.0f} img/s | "
            f"ETA {_format_duration(eta_seconds)}"
        )
        self._jsonl(kind="train", step=step, epoch=epoch, img_per_sec=img_per_sec, **summary)
        scalars = {f"train/{k}": v for k, v in summary.items()}
        self.writer.write_scalars(step, {**scalars, "train/img_per_sec": img_per_sec})

    def eval(self, row: dict, seconds: float) -> None:
        if not self.enabled:
            return
        accuracy = {k: row[k] for k in EVAL_MODELS if k in row}
        self.print(
            f"epoch {row['epoch']} test top-1: "
            + " ".join(f"{k} {100 * v:.2f}%" for k, v in accuracy.items())
            + f" ({seconds:.1f}s)"
        )
        self._jsonl(kind="eval", **row)
        self.writer.write_scalars(row["step"], {f"test/acc_{k}": v for k, v in accuracy.items()})
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _prepare_workdir(workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    for name in ("metrics.jsonl", "results.json"):
        if os.path.exists(os.path.join(workdir, name)):
            raise UserError(
                f"workdir {workdir!r} already holds a run ({name}); pass a new --workdir "
                "(nothing there was changed)"
            )


# --------------------------------------------------------------------------- main loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains the cohort for `config.num_epochs`, evaluating every `eval_every_epochs`.

    Writes to `workdir`: `config.json`, `metrics.jsonl` (train rows at log steps, one eval row
    per evaluation), TensorBoard events, `results.json` and `curves.png`. Returns the results.
    """
    settings = check_config(config, jax.device_count())
    is_chief = jax.process_index() == 0
    if is_chief:
        _prepare_workdir(workdir)

    train_images, train_labels = input_pipeline.load_split(config, "train")
    test_images, test_labels = input_pipeline.load_split(config, "test")
    shard_images, shard_labels = input_pipeline.process_shard(
        train_images, train_labels, jax.process_index(), jax.process_count()
    )
    # From the shard, which is the same size on every process: each process then runs exactly
    # `spe` local batches an epoch, and the schedule's epoch boundaries line up with the data.
    spe = input_pipeline.steps_per_epoch(len(shard_images) * jax.process_count(), config.batch_size)
    train_data = input_pipeline.TrainData(
        config, shard_images, shard_labels, config.batch_size // jax.process_count()
    )

    mesh = Mesh()
    setup, state = build(config, settings, spe)
    state = jax.device_put(state, mesh.replicated)
    train_step = jax.jit(setup.train_step, donate_argnums=0)
    eval_step = jax.jit(setup.eval_step)

    if is_chief:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    total_steps = config.num_epochs * spe
    log = RunLog(workdir, is_chief, config.num_epochs, total_steps)

    num_params = {
        role: int(sum(x.size for x in jax.tree.leaves(state.params[role]))) for role in state.params
    }
    log.print(
        f"FFCL | method {config.method} | teacher {config.teacher} "
        f"({num_params['teacher'] / 1e6:.2f}M) | student {config.student} "
        f"({num_params['student'] / 1e6:.2f}M) | {config.dataset} "
        f"{len(train_images)} train / {len(test_images)} test | batch {config.batch_size} | "
        f"{config.num_epochs} epochs x {spe} steps | {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s) | terms: {', '.join(settings.active_terms())}"
    )

    step = 0
    history: list[dict] = []
    train_seconds = 0.0  # steady-state training time: the first (compiling) step is left out
    first_step_seconds = None
    wall_start = time.time()
    for epoch in range(config.num_epochs):
        pending: list[dict] = []
        interval_start, interval_steps = time.time(), 0
        for local_batch in train_data.epoch(epoch):
            state, metrics = train_step(state, mesh.global_batch(local_batch))
            step += 1
            interval_steps += 1
            pending.append(metrics)
            if first_step_seconds is None:
                jax.block_until_ready(metrics)
                first_step_seconds = time.time() - interval_start
                interval_start, interval_steps, pending = time.time(), 0, []
                log.print(f"compiled and ran the first step in {first_step_seconds:.1f}s")
                continue
            if step % config.log_every_steps == 0 or step % spe == 0:
                summary = _mean_metrics(pending)
                elapsed = time.time() - interval_start
                train_seconds += elapsed
                img_per_sec = interval_steps * config.batch_size / max(elapsed, 1e-9)
                _check_finite(summary, step, workdir)
                eta = (total_steps - step) * config.batch_size / img_per_sec
                log.train(step, epoch + 1, summary, img_per_sec, eta)
                pending, interval_start, interval_steps = [], time.time(), 0
        is_last = epoch + 1 == config.num_epochs
        if (epoch + 1) % config.eval_every_epochs == 0 or is_last:
            eval_start = time.time()
            accuracy = evaluate(eval_step, state, mesh, test_images, test_labels, config)
            row = {"epoch": epoch + 1, "step": step, **accuracy}
            history.append(row)
            log.eval(row, time.time() - eval_start)

    wall_seconds = time.time() - wall_start
    measured_steps = step - 1
    results = {
        "config": json.loads(config.to_json_best_effort()),
        "num_params": num_params,
        "loss_terms": list(settings.active_terms()),
        "wall_seconds": wall_seconds,
        "first_step_seconds": first_step_seconds,
        "train_img_per_sec": (
            measured_steps * config.batch_size / max(train_seconds, 1e-9)
            if measured_steps
            else None
        ),
        "history": history,
        "summary": report.summarize(history),
        "command": " ".join(["python -m ffcl_jax.main", *sys.argv[1:]]),
    }
    if is_chief:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        report.plot_curves(
            os.path.join(workdir, "metrics.jsonl"),
            os.path.join(workdir, "curves.png"),
            title=f"{config.method}: {config.teacher} + {config.student} on {config.dataset}",
        )
        log.print(report.format_table(results["summary"]))
        speed = results["train_img_per_sec"]
        log.print(
            f"wall time {_format_duration(wall_seconds)}"
            + (f"; train step {speed:.0f} img/s" if speed else "")
            + f"; outputs in {workdir} (results.json, metrics.jsonl, curves.png, tensorboard/)"
        )
    log.close()
    return results
