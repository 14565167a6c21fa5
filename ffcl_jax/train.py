"""Training and evaluation of the teacher/student/fusion cohort.

The cohort is split once (`nnx.split`) into a static graph definition and two pytrees,
parameters and BatchNorm statistics; from then on everything is plain `jax.jit` over pytrees.
One jitted, donated step runs the forward pass of both networks and the fusion module, every loss
term, the gradients, the SGD update and the BatchNorm statistics update, and returns a small
metrics dict. The host only synchronises at log steps and after evaluation.

Data parallelism: the batch is a global array sharded over the `data` axis of a `jax.make_mesh`
mesh (every device of every process by default) and the state is replicated. BatchNorm statistics
are computed over the *global* batch under `jit` (SyncBN, `config.batch_norm="global"`), or over
each device's rows (`"per_device"`, via `shard_map`, as PyTorch DDP without SyncBatchNorm).

Runs survive: a checkpoint (see `ffcl_jax.checkpoint`) is written every
`checkpoint_every_epochs`, at a new best and at the end; a run started in a workdir holding one
resumes from it, and continues bit for bit as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import threading
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

from ffcl_jax import checkpoint, export, input_pipeline, losses, models, report
from ffcl_jax.errors import UserError
from ffcl_jax.methods import (
    LossSettings,
    check_feature_stages,
    cohort_objective,
    fused_feature_stages,
    resolve_loss_settings,
)
from ffcl_jax.models.layers import closed_form_batch_norm_backward

# float64 is for exact comparisons (a float64 reference, such as the PyTorch one in the parity
# tests), not for speed: it needs 64-bit JAX (`jax_enable_x64`), which the CLI turns on for it.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
EVAL_MODELS = ("student", "teacher", "fused", "ensemble")
BATCH_NORM_MODES = ("global", "per_device")


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
    if config.compute_dtype == "float64" and not jax.config.jax_enable_x64:
        raise UserError(
            "compute_dtype=float64 needs 64-bit JAX: set JAX_ENABLE_X64=1 (the CLI, "
            "python -m ffcl_jax.main, does it for such a config)"
        )
    for key in ("batch_size", "eval_batch_size"):
        value = config[key]
        if value <= 0 or value % num_devices:
            raise UserError(
                f"config.{key}={value} must be a positive multiple of the {num_devices} devices "
                "it is split over"
            )
    if config.get("validation_size", 0) < 0:
        raise UserError(
            f"config.validation_size must be >= 0 (0: no validation split), got "
            f"{config.validation_size}"
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
    for key in ("log_every_steps", "eval_every_epochs", "checkpoint_every_epochs"):
        if config[key] <= 0:
            raise UserError(f"config.{key} must be > 0, got {config[key]}")
    if config.keep_checkpoints < 1:
        raise UserError(f"config.keep_checkpoints must be >= 1, got {config.keep_checkpoints}")
    valid_best = [m for m in EVAL_MODELS if m != "fused" or settings.use_fusion]
    if config.best_metric and config.best_metric not in valid_best:
        raise UserError(
            f"config.best_metric={config.best_metric!r} is not a model this run evaluates; "
            f"valid: {', '.join(valid_best)}, or '' to keep only the last checkpoints"
        )
    for key, valid in (
        ("xla_cpu_ynn_fusion", ("auto", "xla_default", *CPU_YNN_FUSION)),
        ("batch_norm_backward", BATCH_NORM_BACKWARDS),
    ):
        if config.get(key, "auto") not in valid:
            raise UserError(f"unknown config.{key} {config[key]!r}; valid: {', '.join(valid)}")
    if config.batch_norm not in BATCH_NORM_MODES:
        raise UserError(
            f"unknown config.batch_norm {config.batch_norm!r}; valid: {', '.join(BATCH_NORM_MODES)}"
        )
    if not settings.train_teacher and not config.teacher_checkpoint:
        raise UserError(
            f"method {config.method!r} distils from a trained teacher: set "
            "--config.teacher_checkpoint to the workdir of a finished run with the same teacher "
            "(for example an 'independent' run) or to an exported .npz"
        )
    if settings.train_teacher and config.teacher_checkpoint:
        raise UserError(
            f"config.teacher_checkpoint is only read by method 'kd', not {config.method!r}; "
            "unset it"
        )
    return settings


def is_network_role(role: str) -> bool:
    """Teacher and student take `weight_decay`; every other role is fusion-side."""
    return role in ("teacher", "student")


def make_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int, train_teacher: bool = True
):
    """SGD (Nesterov) with per-role weight decay and an epoch-based multistep schedule.

    Weight decay is added to the gradient before momentum, as `torch.optim.SGD(weight_decay=...)`
    does, and applies to every parameter of a role (BatchNorm included), as in the FFL and
    RepDistiller references: `weight_decay` for teacher and student, `fusion_weight_decay` for
    the fusion side (the fusion module, and the fused feature knowledge's stage fusion modules and
    adapters). With `train_teacher=False` (kd) the teacher is frozen.
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
        optax.add_decayed_weights(config.weight_decay, mask=role_mask(is_network_role)),
        optax.add_decayed_weights(
            config.fusion_weight_decay, mask=role_mask(lambda r: not is_network_role(r))
        ),
        optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
    )
    if not train_teacher:
        # A frozen teacher gets zero updates (no weight decay either) and no optimizer state.
        tx = optax.multi_transform(
            {"train": tx, "frozen": optax.set_to_zero()},
            lambda params: jax.tree_util.tree_map_with_path(
                lambda path, _: "frozen" if path[0].key == "teacher" else "train", params
            ),
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
        fused_feature_stages=fused_feature_stages(settings, models.NUM_STAGES),
        dtype=COMPUTE_DTYPES[config.compute_dtype],
        seed=config.seed,
    )
    if config.compute_dtype == "float64":  # flax creates float32 variables whatever the dtype
        variables = nnx.state(cohort, (nnx.Param, nnx.BatchStat))
        nnx.update(cohort, jax.tree.map(lambda v: v.astype(jnp.float64), variables))
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


def build(
    config, settings: LossSettings, steps_per_epoch: int, mesh: Mesh | None = None
) -> tuple[Setup, TrainState]:
    """Cohort, optimizer, initial state and the two step functions, from a checked config.

    `mesh` is needed only for `config.batch_norm="per_device"` (the step then maps over it).
    """
    info = input_pipeline.dataset_info(config.dataset)
    tx, schedule = make_optimizer(config, steps_per_epoch, settings.train_teacher)
    graphdef, state = create_train_state(create_cohort(config, settings, info), tx)
    per_device_mesh = None
    if config.get("batch_norm", "global") == "per_device":
        if mesh is None:
            raise ValueError("batch_norm='per_device' needs the mesh")
        per_device_mesh = mesh.mesh
    setup = Setup(
        settings=settings,
        info=info,
        graphdef=graphdef,
        schedule=schedule,
        train_step=make_train_step(
            graphdef,
            tx,
            schedule,
            settings,
            info,
            steps_per_epoch,
            per_device_mesh,
            closed_form_bn=closed_form_batch_norm(config),
        ),
        eval_step=make_eval_step(graphdef, info),
    )
    return setup, state


# --------------------------------------------------------------------------- compiling

# XLA:CPU's loop fusion pass copies the forward residual + ReLU chain of a ResNet stage into
# every backward consumer that needs a ReLU mask, so each block's backward recomputes every
# earlier block of its stage: O(depth^2) work (ResNet-110's fwd+bwd 2x slower than linear).
# Handing elementwise ops to YNNPACK fusions instead (library fusions, which the loop fusion pass
# leaves alone) keeps the step linear in depth: the cifar100 pair's step 3x faster. XLA's default
# list (individual dots and convolutions, reductions) also sends the 14x14x32 and 7x7x64
# convolutions to YNNPACK, whose kernels are 2x slower there than XLA's own (Eigen); keeping only
# the reductions (BatchNorm's statistics) in YNNPACK makes the demo pair's step 1.15x faster and,
# with the elementwise ops, the cifar100 pair's 1.05x (experiments/compare_cpu_settings.py).
# Measurements: the README's Speed section. Only XLA:CPU reads these options; each replaces
# XLA's default list of YNNPACK fusion types.
CPU_YNN_FUSION = {
    "eltwise_reduce": "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE",
    "reduce": "LIBRARY_FUSION_TYPE_REDUCE",
    "eltwise": "LIBRARY_FUSION_TYPE_ELTWISE",
    "dot": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}
DEEP_BLOCKS_PER_STAGE = 5  # ResNet-20 (3 a stage) gains nothing, ResNet-56 (9) gains 1.3x


@functools.cache
def _cpu_option_accepted(value: str) -> bool:
    """Whether this jaxlib knows the option (it is experimental and may be renamed)."""
    options = {"xla_cpu_experimental_ynn_fusion_type": value}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
    except Exception:  # an unknown option or value: compile with XLA's defaults instead
        return False
    return True


def compiler_options(config) -> dict[str, str] | None:
    """XLA options for the step functions: `config.xla_cpu_ynn_fusion` on the CPU backend."""
    choice = config.get("xla_cpu_ynn_fusion", "auto")
    if choice == "auto":
        deep = deepest_blocks_per_stage(config) >= DEEP_BLOCKS_PER_STAGE
        choice = "eltwise_reduce" if deep else "reduce"
    if choice == "xla_default" or jax.default_backend() != "cpu":
        return None
    value = CPU_YNN_FUSION[choice]
    if not _cpu_option_accepted(value):
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": value}


# An XLA:CPU option that cannot go per jit like the ones above: XLA reads
# `xla_backend_extra_options` only from XLA_FLAGS, once, when JAX starts its first backend. After
# the fusion pass it inlines called computations (FlattenCallGraph + CallInliner), after which
# XLA's simplifier removes some copies: 215 -> 188 in the demo pair's step, which runs 1.11x
# faster (1.03x for the cifar100 pair). Options named xla_* are not passed on to LLVM, so other
# backends ignore it.
FLATTEN_AFTER_FUSION_FLAG = "--xla_backend_extra_options=xla_cpu_flatten_after_fusion"


def set_process_xla_flags(config, environ=os.environ) -> str | None:
    """Adds `FLATTEN_AFTER_FUSION_FLAG` to XLA_FLAGS if `config.xla_cpu_flatten_after_fusion`;
    returns the flag added, or None. Call it before JAX starts a backend (the CLI and
    bench_step.py do it first); later, XLA no longer reads XLA_FLAGS, and it says so. XLA_FLAGS
    that already set `xla_backend_extra_options` are the user's choice and stay as they are."""
    current = environ.get("XLA_FLAGS", "")
    if not config.get("xla_cpu_flatten_after_fusion", False) or (
        "xla_backend_extra_options" in current
    ):
        return None
    try:  # JAX has no public way to ask whether a backend has started
        from jax._src.xla_bridge import backends_are_initialized
    except ImportError:  # a JAX without it: assume not (the flag then merely may not apply)
        backends_are_initialized = bool
    if backends_are_initialized():
        print(
            "note: config.xla_cpu_flatten_after_fusion has no effect in this process (JAX's "
            f"backend had already started); set XLA_FLAGS={FLATTEN_AFTER_FUSION_FLAG} before "
            "starting Python to get it",
            file=sys.stderr,
        )
        return None
    environ["XLA_FLAGS"] = f"{current} {FLATTEN_AFTER_FUSION_FLAG}".strip()
    return FLATTEN_AFTER_FUSION_FLAG


BATCH_NORM_BACKWARDS = ("auto", "closed_form", "autodiff")


def closed_form_batch_norm(config) -> bool:
    """`config.batch_norm_backward`: "auto" takes the closed form (layers.batch_norm_train) where
    it was measured to pay off, a deep network on the CPU backend (cifar100 pair's step 1.2x);
    for shallow pairs it changes nothing measurable and autodiff keeps earlier runs' numerics."""
    choice = config.get("batch_norm_backward", "autodiff")
    if choice == "auto":
        return jax.default_backend() == "cpu" and deepest_blocks_per_stage(config) >= (
            DEEP_BLOCKS_PER_STAGE
        )
    return choice == "closed_form"


def deepest_blocks_per_stage(config) -> int:
    return max(models.blocks_per_stage(config.teacher), models.blocks_per_stage(config.student))


def jit_steps(setup: Setup, config) -> tuple[Callable, Callable]:
    """The jitted train step (state donated) and eval step, with `compiler_options(config)`."""
    options = compiler_options(config)
    return (
        jax.jit(setup.train_step, donate_argnums=0, compiler_options=options),
        jax.jit(setup.eval_step, compiler_options=options),
    )


# --------------------------------------------------------------------------- steps


def make_train_step(
    graphdef: nnx.GraphDef,
    tx,
    schedule,
    settings: LossSettings,
    info: input_pipeline.DatasetInfo,
    steps_per_epoch: int,
    per_device_mesh: jax.sharding.Mesh | None = None,
    *,
    closed_form_bn: bool = False,
):
    """The whole cohort update as one pure function `(state, batch) -> (state, metrics)`.

    With `per_device_mesh`, the forward pass runs under `shard_map` over its `data` axis, so each
    device normalises its own rows (per-device BatchNorm); losses, metrics and the updated running
    statistics are averaged over devices, and the gradient of the replicated parameters is summed
    by `shard_map`'s transpose, which makes it the gradient of the global mean loss.
    `closed_form_bn`: BatchNorm layers differentiate with `layers.batch_norm_train`.
    """

    def forward(params, batch_stats, batch, epoch):
        images = input_pipeline.normalize(batch["image"], info)
        labels = batch["label"]
        # copy=True: fresh Variables owned by this (grad) trace, so BatchNorm may update them.
        cohort = nnx.merge(graphdef, params, batch_stats, copy=True)
        with closed_form_batch_norm_backward(closed_form_bn):
            outputs = cohort(images, train=True, train_teacher=settings.train_teacher)
        total, terms = cohort_objective(outputs, labels, settings, epoch, info.num_classes)
        for name in ("teacher", "student", "fused"):
            if f"{name}_logits" in outputs:
                terms[f"train_acc_{name}"] = losses.top1_correct(
                    outputs[f"{name}_logits"], labels
                ).mean()
        return total, (terms, nnx.state(cohort, nnx.BatchStat))

    if per_device_mesh is not None:
        local_forward = forward

        def forward(params, batch_stats, batch, epoch):
            def on_device(params, batch_stats, batch, epoch):
                total, aux = local_forward(params, batch_stats, batch, epoch)
                return jax.lax.pmean((total, aux), "data")

            return jax.shard_map(
                on_device,
                mesh=per_device_mesh,
                in_specs=(P(), P(), P("data"), P()),
                out_specs=P(),
            )(params, batch_stats, batch, epoch)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        # Epoch-wise quantities (ramp-up weight) derive from the step inside the graph, so the
        # step never retraces and needs no host input.
        epoch = state.step // steps_per_epoch
        (total, (terms, new_batch_stats)), grads = jax.value_and_grad(forward, has_aux=True)(
            state.params, state.batch_stats, batch, epoch
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": total, **terms, "learning_rate": schedule(state.step)}
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
    """A 1-D data-parallel mesh (`jax.make_mesh`, axis `data`) with the shardings the loop needs.

    `num_devices=-1` takes every device of every process. The axis is `Auto` (GSPMD
    propagation): the step is written for one device and XLA partitions it.
    """

    def __init__(self, num_devices: int = -1):
        devices = jax.devices()
        n = len(devices) if num_devices in (-1, None) else int(num_devices)
        if not 1 <= n <= len(devices):
            raise UserError(
                f"config.mesh.data={num_devices} devices asked for, {len(devices)} available; "
                "use -1 for all of them"
            )
        if n != len(devices) and jax.process_count() > 1:
            raise UserError(
                "a multi-process run shards over every device: leave config.mesh.data at -1"
            )
        self.mesh = jax.make_mesh(
            (n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices[:n]
        )
        self.size = n
        self.data = NamedSharding(self.mesh, P("data"))
        self.replicated = NamedSharding(self.mesh, P())

    def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assembles every process's local batch into one array sharded over `data`.

        A batch already made on the devices (`DeviceTrainData`) is passed through."""
        if all(isinstance(v, jax.Array) for v in local_batch.values()):
            return local_batch
        return {
            k: jax.make_array_from_process_local_data(self.data, v) for k, v in local_batch.items()
        }


def make_train_data(config, images, labels, mesh: Mesh):
    """The training batches: tf.data on the host, or (`config.data_on_device`) made by jit."""
    if config.get("data_on_device", False):
        return input_pipeline.DeviceTrainData(
            config, images, labels, config.batch_size, mesh.data, mesh.replicated
        )
    return input_pipeline.TrainData(
        config, images, labels, config.batch_size, jax.process_index(), jax.process_count()
    )


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


def _summarize_interval(
    pending: list[dict], first_step: int, workdir: str, last_checkpoint: str | None
) -> dict[str, float]:
    """Mean of the metrics of the steps since the last log; stops the run at a non-finite loss,
    naming the first such step and its loss terms."""
    fetched = jax.device_get(pending)
    for offset, metrics in enumerate(fetched):
        if not np.isfinite(metrics["loss"]):
            terms = ", ".join(
                f"{k}={float(v):.4g}"
                for k, v in metrics.items()
                if k != "learning_rate" and not k.startswith("train_acc")
            )
            kept = (
                f"the last good checkpoint ({last_checkpoint}) is kept and a rerun resumes from it"
                if last_checkpoint
                else "no checkpoint had been written yet"
            )
            raise UserError(
                f"non-finite loss at step {first_step + offset} ({terms}); training stopped, "
                f"{kept}, logs are in {workdir}; lower config.learning_rate or use "
                "compute_dtype=float32"
            )
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


class _NoWriter:
    def write_scalars(self, step, scalars) -> None:
        del step, scalars

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class RunLog:
    """Where a run reports: the console, `metrics.jsonl` and TensorBoard (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool, num_epochs: int, total_steps: int):
        self.enabled = enabled
        self.num_epochs, self.total_steps = num_epochs, total_steps
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.writer = None
        if enabled:
            try:
                from clu import metric_writers

                self.writer = metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # clu's TensorBoard writer needs tensorflow (e.g. GPU images)
                self.print(
                    "note: no TensorBoard events (tensorflow is not installed); "
                    "metrics.jsonl has every scalar"
                )
                self.writer = _NoWriter()

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def _jsonl(self, **row) -> None:
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def train(
        self,
        step: int,
        epoch: int,
        summary: dict,
        img_per_sec: float | None,
        eta_seconds: float | None,
    ) -> None:
        """`img_per_sec` / `eta_seconds` are None when the interval timed no step (a log right
        after the compiling first step, e.g. when preempted at step 1)."""
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
            f"train acc {accuracies} | "
            + (
                f"{img_per_sec:.0f} img/s | ETA {_format_duration(eta_seconds)}"
                if img_per_sec
                else "speed not measured yet"
            )
        )
        self._jsonl(kind="train", step=step, epoch=epoch, img_per_sec=img_per_sec, **summary)
        scalars = {f"train/{k}": v for k, v in summary.items()}
        if img_per_sec:
            scalars["train/img_per_sec"] = img_per_sec
        self.writer.write_scalars(step, scalars)

    def eval(self, row: dict, seconds: float) -> None:
        if not self.enabled:
            return
        accuracy = {k: row[k] for k in EVAL_MODELS if k in row}
        split = row["split"]
        self.print(
            f"epoch {row['epoch']} {split} top-1: "
            + " ".join(f"{k} {100 * v:.2f}%" for k, v in accuracy.items())
            + f" ({seconds:.1f}s)"
        )
        self._jsonl(kind="eval", **row)
        self.writer.write_scalars(row["step"], {f"{split}/acc_{k}": v for k, v in accuracy.items()})
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Preempted(Exception):
    """SIGTERM (or the cluster's preemption notice) arrived; a checkpoint has been written."""


class _PreemptionWatch:
    """Turns SIGTERM into a flag the loop checks between steps. With several processes the
    decision comes from orbax/JAX's preemption sync point, so every process stops at the same
    step."""

    def __init__(self, checkpoints: checkpoint.RunCheckpoints):
        self.checkpoints = checkpoints
        self.requested = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.checkpoints.manager.reached_preemption(step)
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _start_or_resume(
    workdir: str, config, fresh: bool, is_chief: bool
) -> tuple[checkpoint.RunCheckpoints, int | None, str | None]:
    """Prepares the workdir; returns its checkpoints, the step to resume from (None: a new run)
    and, for --fresh, where an earlier run was moved."""
    moved = None
    if is_chief:
        os.makedirs(workdir, exist_ok=True)
        if fresh:
            moved = checkpoint.move_previous_run(workdir)
    _sync("ffcl_workdir_ready")
    had_outputs = [
        name
        for name in checkpoint.existing_outputs(workdir)
        if name != checkpoint.CHECKPOINT_SUBDIR
    ]
    resume_step = None
    if os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR)):
        with checkpoint.RunCheckpoints(workdir, config, read_only=True) as existing:
            resume_step = existing.latest_step()
    if resume_step is None and had_outputs:
        raise UserError(
            f"workdir {workdir!r} holds a run ({', '.join(had_outputs)}) but no checkpoint to "
            "resume from (it stopped before its first checkpoint, or an older version wrote it); "
            "pass --fresh to move it aside and start over, or use a new --workdir "
            "(nothing there was changed)"
        )
    _sync("ffcl_workdir_checked")
    checkpoints = checkpoint.RunCheckpoints(workdir, config)
    return checkpoints, resume_step, moved


def _with_frozen_teacher(state: TrainState, config) -> tuple[TrainState, str]:
    params, batch_stats, source = export.load_network(
        config.teacher_checkpoint,
        "teacher",
        config,
        like=(state.params["teacher"], state.batch_stats["teacher"]),
    )

    def replace_teacher(tree, teacher_arrays):
        flat = export.flatten(tree)
        flat.update({f"teacher/{name}": value for name, value in teacher_arrays.items()})
        return export.fill_like(tree, flat, "the cohort with the loaded teacher")

    return (
        state.replace(
            params=replace_teacher(state.params, params),
            batch_stats=replace_teacher(state.batch_stats, batch_stats),
        ),
        source,
    )


# --------------------------------------------------------------------------- main loop


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, fresh: bool = False
) -> dict[str, Any]:
    """Trains the cohort for `config.num_epochs`, evaluating every `eval_every_epochs`.

    Writes to `workdir`: `config.json`, `metrics.jsonl` (train rows at log steps, one eval row
    per evaluation), TensorBoard events, `checkpoints/`, `results.json` and `curves.png`.
    Resumes from the latest checkpoint in `workdir`, if any; `fresh=True` first moves an earlier
    run to `workdir/previous_runs/`. Returns the results.
    """
    mesh = Mesh(config.mesh.data)
    settings = check_config(config, mesh.size)
    is_chief = jax.process_index() == 0

    train_images, train_labels = input_pipeline.load_split(config, "train")
    test_images, test_labels = input_pipeline.load_split(config, "test")
    splits = {"test": (test_images, test_labels)}
    if config.get("validation_size", 0):
        (train_images, train_labels), splits["validation"] = input_pipeline.hold_out_validation(
            config, train_images, train_labels
        )
    train_data = make_train_data(config, train_images, train_labels, mesh)
    spe = train_data.steps_per_epoch
    setup, state = build(config, settings, spe, mesh)

    checkpoints, resume_step, moved = _start_or_resume(workdir, config, fresh, is_chief)
    watch = _PreemptionWatch(checkpoints)
    try:
        with jax.set_mesh(mesh.mesh):
            progress = {
                "epoch": 0,  # completed epochs
                "batch_in_epoch": 0,  # batches of the next epoch already trained (preemption)
                "history": [],
                "best": None,
                "train_seconds": 0.0,
                "measured_steps": 0,
                "wall_seconds": 0.0,
                "first_step_seconds": None,
                "resumed_at_steps": [],
            }
            notes = []
            if moved:
                notes.append(f"moved the earlier run to {moved}")
            if resume_step is not None:
                meta = checkpoints.read_meta(resume_step)
                checkpoints.check_config(resume_step, meta, config)
                state = checkpoints.restore_state(
                    resume_step, jax.device_put(state, mesh.replicated)
                )
                progress = meta["progress"]
                progress["resumed_at_steps"].append(resume_step)
                if progress["epoch"] >= config.num_epochs:
                    notes.append(
                        f"the run in {workdir} had already finished its {progress['epoch']} "
                        "epochs: raise --config.num_epochs to train longer, or pass --fresh"
                    )
                notes.append(
                    f"resumed from checkpoint step {resume_step} (epoch {progress['epoch']}"
                    + (
                        f", batch {progress['batch_in_epoch']}"
                        if progress["batch_in_epoch"]
                        else ""
                    )
                    + f") in {checkpoints.directory}"
                )
            elif not settings.train_teacher:
                state, source = _with_frozen_teacher(state, config)
                notes.append(f"frozen teacher loaded from {source}")
            state = jax.device_put(state, mesh.replicated)
            return _train_loop(
                config,
                workdir,
                settings,
                setup,
                state,
                mesh,
                train_data,
                (train_images, splits),
                checkpoints,
                watch,
                progress,
                resume_step,
                notes,
            )
    finally:
        watch.close()
        checkpoints.wait()  # a save in flight completes: the last good checkpoint stays
        checkpoints.close()


def _train_loop(
    config,
    workdir,
    settings,
    setup: Setup,
    state: TrainState,
    mesh: Mesh,
    train_data: input_pipeline.TrainData,
    arrays,
    checkpoints: checkpoint.RunCheckpoints,
    watch: _PreemptionWatch,
    progress: dict,
    resume_step: int | None,
    notes: list[str],
) -> dict[str, Any]:
    train_images, splits = arrays
    # Each epoch is evaluated on the validation split when there is one, and the test split is
    # then evaluated once, after training: model selection never sees it.
    eval_split = "validation" if "validation" in splits else "test"
    is_chief = jax.process_index() == 0
    spe = train_data.steps_per_epoch
    train_step, eval_step = jit_steps(setup, config)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if is_chief:
        if resume_step is not None:
            checkpoint.truncate_metrics_log(metrics_path, resume_step)
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
        f"({num_params['student'] / 1e6:.2f}M) | {config.dataset} {len(train_images)} train / "
        + " / ".join(f"{len(images)} {name}" for name, (images, _) in sorted(splits.items()))
        + f" | batch {config.batch_size}, "
        f"{config.compute_dtype} compute | "
        f"{config.num_epochs} epochs x {spe} steps | {mesh.size} "
        f"{jax.devices()[0].platform} device(s) in {jax.process_count()} process(es), "
        f"batch norm {config.batch_norm} | terms: {', '.join(settings.active_terms())}"
    )
    for note in notes:
        log.print(note)

    step = int(jax.device_get(state.step))
    expected_step = progress["epoch"] * spe + progress["batch_in_epoch"]
    if step != expected_step:
        raise UserError(
            f"checkpoint step {step} does not match its epoch {progress['epoch']} x {spe} steps "
            f"+ {progress['batch_in_epoch']} (was batch_size or the data set changed?); use a "
            "new --workdir or pass --fresh (nothing was deleted)"
        )
    history: list[dict] = progress["history"]
    last_checkpoint = f"step {resume_step}" if resume_step is not None else None
    wall_clock = {"since": time.time()}  # wall time not yet added to progress
    first_step_done = False

    def add_wall_time() -> None:
        now = time.time()
        progress["wall_seconds"] += now - wall_clock["since"]
        wall_clock["since"] = now

    def save(epoch_done: int, batch_in_epoch: int, eval_row: dict | None) -> None:
        nonlocal last_checkpoint
        add_wall_time()
        progress.update(epoch=epoch_done, batch_in_epoch=batch_in_epoch)
        metrics = None
        if eval_row is not None:
            metrics = {k: eval_row[k] for k in EVAL_MODELS if k in eval_row}
        meta = {"config": json.loads(config.to_json_best_effort()), "progress": progress}
        checkpoints.save(step, state, meta, metrics)
        last_checkpoint = f"step {step}"

    def stop_preempted(when: str) -> None:
        checkpoints.wait()
        log.close()
        raise Preempted(
            f"preempted {when}: checkpoint step {step} is in {checkpoints.directory}; "
            "run the same command again to resume"
        )

    start_epoch, skip = progress["epoch"], progress["batch_in_epoch"]
    preempted = False
    for epoch in range(start_epoch, config.num_epochs):
        pending: list[dict] = []
        batch_in_epoch = skip if epoch == start_epoch else 0
        interval_start, interval_steps, interval_first = time.time(), 0, step + 1
        for local_batch in train_data.epoch(epoch, skip_batches=batch_in_epoch):
            state, metrics = train_step(state, mesh.global_batch(local_batch))
            step += 1
            batch_in_epoch += 1
            interval_steps += 1
            pending.append(metrics)
            if not first_step_done:
                # The first step of a session compiles: it counts for the loss log, not for
                # the speed.
                jax.block_until_ready(metrics)
                first_step_done = True
                seconds = time.time() - interval_start
                if progress["first_step_seconds"] is None:
                    progress["first_step_seconds"] = seconds
                log.print(f"compiled and ran the first step in {seconds:.1f}s")
                interval_start, interval_steps = time.time(), 0
            preempted = watch.reached(step)
            if step % config.log_every_steps == 0 or batch_in_epoch == spe or preempted:
                summary = _summarize_interval(pending, interval_first, workdir, last_checkpoint)
                elapsed = time.time() - interval_start
                if interval_steps:
                    progress["train_seconds"] += elapsed
                    progress["measured_steps"] += interval_steps
                img_per_sec = eta = None
                if interval_steps:
                    img_per_sec = interval_steps * config.batch_size / max(elapsed, 1e-9)
                    eta = (total_steps - step) * config.batch_size / img_per_sec
                log.train(step, epoch + 1, summary, img_per_sec, eta)
                pending, interval_start, interval_steps = [], time.time(), 0
                interval_first = step + 1
            if preempted and batch_in_epoch < spe:
                save(epoch, batch_in_epoch, None)
                stop_preempted(f"at step {step}")
        is_last = epoch + 1 == config.num_epochs
        row = None
        if (epoch + 1) % config.eval_every_epochs == 0 or is_last:
            eval_start = time.time()
            accuracy = evaluate(eval_step, state, mesh, *splits[eval_split], config)
            row = {"epoch": epoch + 1, "step": step, "split": eval_split, **accuracy}
            history.append(row)
            log.eval(row, time.time() - eval_start)
        new_best = False
        if row is not None and config.best_metric:
            best = progress["best"]
            new_best = best is None or row[config.best_metric] > best["value"]
            if new_best:
                progress["best"] = {
                    "metric": config.best_metric,
                    "value": row[config.best_metric],
                    "epoch": epoch + 1,
                    "step": step,
                }
        if (epoch + 1) % config.checkpoint_every_epochs == 0 or is_last or new_best:
            save(epoch + 1, 0, row)
        if preempted and not is_last:  # the notice came with the epoch's last step
            stop_preempted(f"after epoch {epoch + 1}")

    checkpoints.wait()
    final_test = None
    if eval_split != "test":
        eval_start = time.time()
        accuracy = evaluate(eval_step, state, mesh, *splits["test"], config)
        final_test = {"epoch": config.num_epochs, "step": step, "split": "test", **accuracy}
        log.eval(final_test, time.time() - eval_start)
    add_wall_time()
    measured = progress["measured_steps"]
    results = {
        "config": json.loads(config.to_json_best_effort()),
        "num_params": num_params,
        "loss_terms": list(settings.active_terms()),
        # What "auto" resolved to on this backend: the numbers depend on it (summation order).
        "xla_compiler_options": compiler_options(config),
        "closed_form_batch_norm": closed_form_batch_norm(config),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "wall_seconds": progress["wall_seconds"],
        "first_step_seconds": progress["first_step_seconds"],
        "train_img_per_sec": (
            measured * config.batch_size / max(progress["train_seconds"], 1e-9)
            if measured
            else None
        ),
        "eval_split": eval_split,
        "history": history,
        "summary": report.summarize(history),
        # The test split evaluated once after training, when the epochs were evaluated on a
        # validation split (None otherwise: `history` is then the test split's).
        "final_test": final_test,
        "best_checkpoint": progress["best"],
        "resumed_at_steps": progress["resumed_at_steps"],
        "command": " ".join(["python -m ffcl_jax.main", *sys.argv[1:]]),
    }
    if is_chief:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        report.plot_curves(
            metrics_path,
            os.path.join(workdir, "curves.png"),
            title=f"{config.method}: {config.teacher} + {config.student} on {config.dataset}",
        )
        log.print(report.format_table(results["summary"], eval_split, final_test))
        speed = results["train_img_per_sec"]
        log.print(
            f"wall time {_format_duration(progress['wall_seconds'])}"
            + (f"; train step {speed:.0f} img/s" if speed else "")
            + f"; outputs in {workdir} (results.json, metrics.jsonl, curves.png, tensorboard/, "
            "checkpoints/)"
        )
    log.close()
    return results
