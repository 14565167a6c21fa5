"""The parts of the branch methods' multi-branch network (ffcl_jax/methods/branches.py builds
and runs it): a peer branch (a zoo network without the shared trunk), ONE's gate, OKDDip's
attention over the peers, and the gradient rescaling CL-ILR applies to the trunk.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ffcl_jax.models.batch_norm import batch_norm
from ffcl_jax.models.layers import at_least_float32, dense, dense_kernel_init, global_avg_pool

GATES = ("none", "one")


@jax.custom_vjp
def _scale_gradient(x: jax.Array, factor: jax.Array) -> jax.Array:
    return x


def _scale_gradient_fwd(x, factor):
    return x, factor


def _scale_gradient_bwd(factor, dy):
    return dy * factor.astype(dy.dtype), jnp.zeros_like(factor)


_scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def scale_gradient(x: jax.Array, factor: float) -> jax.Array:
    """`x` in the forward pass; its gradient multiplied by `factor` in the backward pass."""
    return _scale_gradient(x, jnp.asarray(factor, jnp.float32))


class Gate(nnx.Module):
    """ONE's gate: softmax weights over the branches from the pooled shared map (linear, then
    BatchNorm and ReLU, then softmax), one set of weights per example."""

    def __init__(self, channels: int, num_branches: int, *, dtype=None, rngs: nnx.Rngs):
        self.linear = dense(channels, num_branches, dtype=dtype, rngs=rngs)
        self.bn = batch_norm(num_branches, dtype=dtype, rngs=rngs)

    def __call__(self, shared_map: jax.Array, *, train: bool) -> jax.Array:
        z = self.bn(self.linear(global_avg_pool(shared_map)), use_running_average=not train)
        return jax.nn.softmax(at_least_float32(nnx.relu(z)), axis=-1)


class PeerAttention(nnx.Module):
    """OKDDip's attention over the peers: shared bias-free query and key projections (to
    channels // 8) of each peer's pooled last-stage map; per example, row a of the softmax of
    q_a . k_b over all peers b (itself included) weighs the peers' logits into peer a's target."""

    def __init__(self, channels: int, *, dtype=None, rngs: nnx.Rngs):
        embedding = max(channels // 8, 1)

        def projection():  # torch.nn.Linear's default initialisation, no bias
            return nnx.Linear(
                channels,
                embedding,
                use_bias=False,
                kernel_init=dense_kernel_init,
                dtype=dtype,
                rngs=rngs,
            )

        self.query, self.key = projection(), projection()

    def __call__(self, peer_maps: list[jax.Array]) -> jax.Array:
        pooled = jnp.stack([global_avg_pool(m) for m in peer_maps], axis=1)  # batch, peers, C
        energy = jnp.einsum("bpe,bqe->bpq", self.query(pooled), self.key(pooled))
        return jax.nn.softmax(at_least_float32(energy), axis=-1)


def drop_trunk(network: nnx.Module, first_branch_stage: int) -> nnx.Module:
    """A zoo network without what the branches share (its stem and the stages before
    `first_branch_stage`): a peer branch's upper stages and head."""
    for name in network.STEM_MODULES:
        setattr(network, name, None)
    network.stages = nnx.List(
        [nnx.List([]) if i < first_branch_stage else s for i, s in enumerate(network.stages)]
    )
    return network
