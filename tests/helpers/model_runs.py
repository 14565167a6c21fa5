"""One zoo model's training-mode forward and backward in float64 under chosen layer kernels
(scanned blocks, a remat policy), for tests that compare two forms of the same computation to
rounding rather than to float32's ill-conditioning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ffcl_jax.models import create_model
from ffcl_jax.models.layers import LayerKernels, layer_kernels


def float64_model_run(name: str, kernels: LayerKernels, training: bool = True):
    """`(the traced step's jaxpr text, (loss, (logits, features, statistics)) and gradients,
    the initial statistics)` of a sum-of-squares loss over the model's outputs."""
    graphdef, params, stats = nnx.split(
        create_model(name, 10, rngs=nnx.Rngs(0)), nnx.Param, nnx.BatchStat
    )
    params, stats = jax.tree.map(lambda a: np.asarray(a, np.float64), (params, stats))
    images = np.asarray(jax.random.normal(jax.random.key(1), (4, 8, 8, 3)), np.float64)

    def loss(params, stats):
        model = nnx.merge(graphdef, params, stats, copy=True)
        with layer_kernels(kernels):
            logits, features = model(images, train=training)
        total = jnp.sum(logits**2) + sum(jnp.mean(f**2) for f in features)
        return total, (logits, features, nnx.state(model, nnx.BatchStat))

    run = jax.value_and_grad(loss, has_aux=True)
    return str(jax.make_jaxpr(run)(params, stats)), jax.jit(run)(params, stats), stats
