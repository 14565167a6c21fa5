"""The pure step functions of a run: the train state, the one jitted train step of the whole
cohort (forward, every loss term, gradients, the optimizer, BatchNorm statistics, the method's
own state) and the eval step. They know the method only through `ffcl_jax.methods.Method`;
`ffcl_jax.train` builds and drives them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import PartitionSpec as P

from ffcl_jax import datasets, input_pipeline, losses
from ffcl_jax.methods import Method
from ffcl_jax.models import batch_norm
from ffcl_jax.models.layers import XLA_OPS, LayerKernels, layer_kernels


class TrainState(struct.PyTreeNode):
    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    # What the method keeps besides the parameters (`Method.init_state`; None: nothing), such
    # as PCL's temporal mean. Checkpoints save its entries beside `params`.
    method_state: dict[str, Any] | None = None


def create_train_state(cohort: nnx.Module, tx, method: Method) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, batch_stats = nnx.split(cohort, nnx.Param, nnx.BatchStat)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        method_state=method.init_state(params, batch_stats),
    )
    return graphdef, state


def make_forward(
    graphdef: nnx.GraphDef,
    method: Method,
    info: datasets.DatasetInfo,
    kernels: LayerKernels = XLA_OPS,
):
    """`(params, batch_stats, batch, epoch, method_state) -> (total, (terms, batch_stats, aux))`:
    the cohort in training mode, the method's objective and training accuracies."""

    def forward(params, batch_stats, batch, epoch, method_state):
        images = input_pipeline.normalize(batch["image"], info)
        labels = batch["label"]
        # copy=True: fresh Variables owned by this (grad) trace, so BatchNorm may update them.
        cohort = nnx.merge(graphdef, params, batch_stats, copy=True)

        def model_of(other_params, other_stats):
            return nnx.merge(graphdef, other_params, other_stats, copy=True)

        with layer_kernels(kernels):
            outputs = method.forward(cohort, images, train=True)
            extra, aux = method.state_outputs(method_state, images, model_of, train=True)
        total, terms = method.loss({**outputs, **extra}, labels, epoch, info.num_classes)
        for name, logits in method.train_accuracy_logits(outputs).items():
            terms[f"train_acc_{name}"] = losses.top1_correct(logits, labels).mean()
        return total, (terms, nnx.state(cohort, nnx.BatchStat), aux)

    return forward


def make_train_step(
    graphdef: nnx.GraphDef,
    tx,
    schedule,
    method: Method,
    info: datasets.DatasetInfo,
    steps_per_epoch: int,
    per_device_mesh: jax.sharding.Mesh | None = None,
    kernels: LayerKernels = XLA_OPS,
    batch_norm_groups: list[list[int]] | None = None,
):
    """The whole cohort update as one pure function `(state, batch) -> (state, metrics)`.

    With `per_device_mesh`, the forward pass runs under `shard_map` over its `data` axis, so each
    device normalises its own rows (per-device BatchNorm); losses, metrics and the updated running
    statistics are averaged over devices, and the gradient of the replicated parameters is summed
    by `shard_map`'s transpose, which makes it the gradient of the global mean loss.
    `batch_norm_groups` (with `per_device_mesh`): device groups over whose rows BatchNorm takes
    its statistics instead (`config.batch_norm="groups:N"`). JAX's collectives over device groups
    do not check which values vary over the mesh (`check_vma`), so that check is off for them.
    `kernels`: what the layers compute with (XLA's ops by default; `xla_cpu.layer_kernels`).
    """
    forward = make_forward(graphdef, method, info, kernels)

    if per_device_mesh is not None:
        local_forward = forward

        def forward(params, batch_stats, batch, epoch, method_state):
            def on_device(params, batch_stats, batch, epoch, method_state):
                groups = contextlib.nullcontext()
                if batch_norm_groups is not None:
                    groups = batch_norm.batch_norm_groups("data", batch_norm_groups)
                with groups:
                    total, aux = local_forward(params, batch_stats, batch, epoch, method_state)
                return jax.lax.pmean((total, aux), "data")

            return jax.shard_map(
                on_device,
                mesh=per_device_mesh,
                in_specs=(P(), P(), P("data"), P(), P()),
                out_specs=P(),
                check_vma=batch_norm_groups is None,
            )(params, batch_stats, batch, epoch, method_state)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        # Epoch-wise quantities (ramp-up weight) derive from the step inside the graph, so the
        # step never retraces and needs no host input.
        epoch = state.step // steps_per_epoch
        (total, (terms, new_batch_stats, aux)), grads = jax.value_and_grad(forward, has_aux=True)(
            state.params, state.batch_stats, batch, epoch, state.method_state
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": total, **terms, "learning_rate": schedule(state.step)}
        # A method may pause members for a step (SwitOKD's teacher in expert mode), decided from
        # the terms, which are global-batch means here (after `pmean` under per-device BN).
        takes_update = method.member_updates(terms)
        if takes_update:
            params, opt_state = keep_paused_members(
                takes_update, params, opt_state, state.params, state.opt_state
            )
            for member, flag in takes_update.items():
                metrics[f"updates_{member}"] = jnp.asarray(flag, jnp.float32)
        return state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=new_batch_stats,
            opt_state=opt_state,
            method_state=method.update_state(state.method_state, params, state.step, aux),
        ), metrics

    return train_step


def keep_paused_members(takes_update, params, opt_state, old_params, old_opt_state):
    """`params` and `opt_state` after a step, with the members whose flag in `takes_update` is
    False as they were before it: their parameters, and every optimizer-state entry that belongs
    to one of their parameters (momentum; any per-parameter state of the chain). State shared by
    every member (the schedule's step count) advances as usual, so a paused member resumes on
    the same learning-rate schedule. `jnp.where` on traced flags: no host synchronisation.

    An optimizer-state leaf belongs to a parameter when its tree path ends with that parameter's
    path (optax's per-parameter states mirror the parameter tree, masked or not)."""
    member_of = {
        tuple(str(k) for k in path): path[0].key
        for path, _ in jax.tree_util.tree_flatten_with_path(old_params)[0]
    }
    depths = sorted({len(p) for p in member_of})
    unknown = set(takes_update) - {m for m in member_of.values()}
    if unknown:
        raise ValueError(f"member_updates names members without parameters: {sorted(unknown)}")

    def owner(path):
        keys = tuple(str(k) for k in path)
        for depth in depths:
            if len(keys) >= depth and keys[-depth:] in member_of:
                return member_of[keys[-depth:]]
        return None

    def keep(path, new, old):
        member = owner(path)
        if member is None or member not in takes_update:
            return new
        return jnp.where(takes_update[member], new, old)

    params = jax.tree_util.tree_map_with_path(keep, params, old_params)
    opt_state = jax.tree_util.tree_map_with_path(keep, opt_state, old_opt_state)
    return params, opt_state


def loss_term_names(forward, state: TrainState, info: datasets.DatasetInfo, num_views: int):
    """The names of the terms the objective computes (what a run logs), read off the objective
    itself by tracing it on abstract inputs (nothing runs)."""
    views = (num_views,) if num_views > 1 else ()
    batch = {
        "image": jax.ShapeDtypeStruct((2, *views, *info.image_shape), jnp.uint8),
        "label": jax.ShapeDtypeStruct((2,), jnp.int32),
    }
    epoch = jax.ShapeDtypeStruct((), jnp.int32)
    names = []

    def terms_of(*args):
        _, (terms, _, _) = forward(*args)
        names.extend(terms)  # at trace time, in the objective's own order (outputs are sorted)
        return terms

    jax.eval_shape(terms_of, state.params, state.batch_stats, batch, epoch, state.method_state)
    return tuple(k for k in names if k != "rampup_weight" and not k.startswith("train_acc_"))


def make_eval_step(
    graphdef: nnx.GraphDef,
    method: Method,
    info: datasets.DatasetInfo,
    kernels: LayerKernels = XLA_OPS,
):
    """`(params, batch_stats, batch, method_state=None) -> correct counts` of every model the
    method evaluates."""

    def eval_step(params, batch_stats, batch, method_state=None):
        images = input_pipeline.normalize(batch["image"], info)

        def model_of(other_params, other_stats):
            return nnx.merge(graphdef, other_params, other_stats)

        with layer_kernels(kernels):
            outputs = method.forward(model_of(params, batch_stats), images, train=False)
            state_outputs = method.eval_state_outputs(method_state, images, model_of)
        labels, mask = batch["label"], batch["mask"]
        logits = method.evaluated(outputs, state_outputs)
        counts = {k: jnp.sum(losses.top1_correct(z, labels) * mask) for k, z in logits.items()}
        counts["count"] = jnp.sum(mask)
        return counts

    return eval_step
