"""The pure step functions of a run: the train state, the one jitted train step of the whole
cohort (forward, every loss term, gradients, SGD, BatchNorm statistics, PCL's temporal mean)
and the eval step. `ffcl_jax.train` builds and drives them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from ffcl_jax import input_pipeline, losses
from ffcl_jax.methods import LossSettings
from ffcl_jax.models.layers import closed_form_batch_norm_backward, onednn_kernels
from ffcl_jax.objectives import cohort_objective, evaluated_logits


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    # PCL's temporal mean: an EMA of `params` and its own BatchNorm statistics (None: no EMA).
    mean_params: nnx.State | None = None
    mean_batch_stats: nnx.State | None = None

    @property
    def mean_model(self) -> tuple[nnx.State, nnx.State] | None:
        if self.mean_params is None:
            return None
        return self.mean_params, self.mean_batch_stats


def create_train_state(
    cohort: nnx.Module, tx, temporal_mean: bool = False
) -> tuple[nnx.GraphDef, TrainState]:
    """`temporal_mean` (PCL): the EMA starts as a copy of the initial weights and statistics."""
    graphdef, params, batch_stats = nnx.split(cohort, nnx.Param, nnx.BatchStat)
    copy = functools.partial(jax.tree.map, jnp.copy)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        mean_params=copy(params) if temporal_mean else None,
        mean_batch_stats=copy(batch_stats) if temporal_mean else None,
    )
    return graphdef, state


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
    onednn: bool = False,
):
    """The whole cohort update as one pure function `(state, batch) -> (state, metrics)`.

    With `per_device_mesh`, the forward pass runs under `shard_map` over its `data` axis, so each
    device normalises its own rows (per-device BatchNorm); losses, metrics and the updated running
    statistics are averaged over devices, and the gradient of the replicated parameters is summed
    by `shard_map`'s transpose, which makes it the gradient of the global mean loss.
    `closed_form_bn`: BatchNorm layers differentiate with `layers.batch_norm_train`.
    `onednn`: float32 convolutions and training-mode BatchNorm run as `ffcl_jax.cpu_kernels`.
    With PCL's temporal mean in the state, it runs on the same batch in training mode (its own
    BatchNorm statistics update; its logits are targets only) and its weights follow the
    updated ones: mean <- d mean + (1 - d) params, d = min(1 - 1/(step + 1), decay).
    """

    def forward(params, batch_stats, batch, epoch, mean_model):
        images = input_pipeline.normalize(batch["image"], info)
        labels = batch["label"]
        # copy=True: fresh Variables owned by this (grad) trace, so BatchNorm may update them.
        cohort = nnx.merge(graphdef, params, batch_stats, copy=True)
        new_mean_stats = None
        with closed_form_batch_norm_backward(closed_form_bn), onednn_kernels(onednn):
            outputs = cohort(images, train=True, train_teacher=settings.train_teacher)
            if mean_model is not None:
                mean_cohort = nnx.merge(graphdef, *mean_model, copy=True)
                mean_logits = mean_cohort(images, train=True)["branch_logits"]
                outputs["mean_branch_logits"] = [jax.lax.stop_gradient(z) for z in mean_logits]
                new_mean_stats = nnx.state(mean_cohort, nnx.BatchStat)
        total, terms = cohort_objective(outputs, labels, settings, epoch, info.num_classes)
        for name in ("teacher", "student", "fused"):
            if f"{name}_logits" in outputs:
                terms[f"train_acc_{name}"] = losses.top1_correct(
                    outputs[f"{name}_logits"], labels
                ).mean()
        return total, (terms, nnx.state(cohort, nnx.BatchStat), new_mean_stats)

    if per_device_mesh is not None:
        local_forward = forward

        def forward(params, batch_stats, batch, epoch, mean_model):
            def on_device(params, batch_stats, batch, epoch, mean_model):
                total, aux = local_forward(params, batch_stats, batch, epoch, mean_model)
                return jax.lax.pmean((total, aux), "data")

            return jax.shard_map(
                on_device,
                mesh=per_device_mesh,
                in_specs=(P(), P(), P("data"), P(), P()),
                out_specs=P(),
            )(params, batch_stats, batch, epoch, mean_model)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        # Epoch-wise quantities (ramp-up weight) derive from the step inside the graph, so the
        # step never retraces and needs no host input.
        epoch = state.step // steps_per_epoch
        (total, (terms, new_batch_stats, new_mean_stats)), grads = jax.value_and_grad(
            forward, has_aux=True
        )(state.params, state.batch_stats, batch, epoch, state.mean_model)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": total, **terms, "learning_rate": schedule(state.step)}
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=new_batch_stats, opt_state=opt_state
        )
        if state.mean_params is not None:
            decay = jnp.minimum(1.0 - 1.0 / (state.step + 1), settings.temporal_mean_decay)
            new_state = new_state.replace(
                mean_params=jax.tree.map(
                    lambda mean, p: (decay * mean + (1 - decay) * p).astype(p.dtype),
                    state.mean_params,
                    params,
                ),
                mean_batch_stats=new_mean_stats,
            )
        return new_state, metrics

    return train_step


def make_eval_step(
    graphdef: nnx.GraphDef, info: input_pipeline.DatasetInfo, *, onednn: bool = False
):
    """`(params, batch_stats, batch, mean_model=None) -> correct counts` of every model
    `evaluated_logits` names; `mean_model` is `TrainState.mean_model` (PCL's temporal mean)."""

    def eval_step(params, batch_stats, batch, mean_model=None):
        images = input_pipeline.normalize(batch["image"], info)
        with onednn_kernels(onednn):
            outputs = nnx.merge(graphdef, params, batch_stats)(images, train=False)
            mean_outputs = None
            if mean_model is not None:
                mean_outputs = nnx.merge(graphdef, *mean_model)(images, train=False)
        labels, mask = batch["label"], batch["mask"]
        logits = evaluated_logits(outputs, mean_outputs)
        counts = {k: jnp.sum(losses.top1_correct(z, labels) * mask) for k, z in logits.items()}
        counts["count"] = jnp.sum(mask)
        return counts

    return eval_step
