"""The multi-branch network of the branch-based online distillation baselines (ONE, CL-ILR, ...).

One zoo network's stem and lower stages are shared; its last `branch_stages` stages and its
head (classifier) are copied into `num_branches` branches. Branch 0 together with the shared
trunk is exactly the plain zoo network, kept whole as the cohort's `student`, so the deployable
student of a branch method is a zoo network with the single network's parameter count, and
`export` writes it as any other student. The other branches hold only their upper stages and
head (`peers`). ONE's gate weighs the branches from the shared trunk's output; PCL's
peer-ensemble classifier reads the branches' pooled last maps. Given a batch of views (PCL), the
trunk runs once per view and branch i continues from view i.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ffcl_jax.models.layers import (
    at_least_float32,
    batch_norm,
    dense,
    dense_kernel_init,
    global_avg_pool,
    member_views,
)

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


class BranchCohort(nnx.Module):
    """`student` (branch 0 with the shared trunk: a whole zoo network), `peers` (branches 1..m-1)
    and, for ONE, the `gate`; for OKDDip, the `attention` over the peers (branch 0 is then the
    group leader); for PCL, the `peer_ensemble` classifier (a linear layer over the branches'
    concatenated pooled maps)."""

    def __init__(
        self,
        make_network,
        num_branches: int,
        branch_stages: int,
        gate: str,
        *,
        backprop_rescale: bool,
        peer_attention: bool = False,
        peer_ensemble: bool = False,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        """`make_network(rngs)` builds the zoo network; `backprop_rescale` (CL-ILR) scales the
        gradient reaching the shared trunk from the branches by 1/num_branches."""
        self.student = make_network(rngs)
        num_stages = len(self.student.stages)
        if not 1 <= branch_stages <= num_stages:
            raise ValueError(f"branch_stages must be in 1..{num_stages}, got {branch_stages}")
        self.first_branch_stage = num_stages - branch_stages
        self.peers = nnx.List(
            [
                drop_trunk(make_network(rngs), self.first_branch_stage)
                for _ in range(num_branches - 1)
            ]
        )
        gate_module = None
        if gate == "one":
            if self.first_branch_stage == 0:
                raise ValueError("ONE's gate needs a shared stage: branch_stages < the stages")
            channels = self.student.stage_channels[self.first_branch_stage - 1]
            gate_module = Gate(channels, num_branches, dtype=dtype, rngs=rngs)
        self.gate = gate_module
        attention = None
        if peer_attention:
            if num_branches < 3:
                raise ValueError("OKDDip's attention needs at least two peers besides branch 0")
            attention = PeerAttention(self.student.stage_channels[-1], dtype=dtype, rngs=rngs)
        self.attention = attention
        ensemble = None
        if peer_ensemble:
            channels = self.student.stage_channels[-1]
            num_classes = self.student.classifier.out_features
            ensemble = dense(num_branches * channels, num_classes, dtype=dtype, rngs=rngs)
        self.peer_ensemble = ensemble
        self.num_branches = num_branches
        self.backprop_rescale = backprop_rescale

    def __call__(self, images: jax.Array, *, train: bool, train_teacher: bool = True) -> dict:
        del train_teacher  # no teacher: the branches teach each other
        if images.ndim == 4:  # one batch for every branch: the trunk runs once
            trunks = [self._trunk(images, train=train)] * self.num_branches
        else:  # a view per branch (PCL): the trunk runs on each
            views = member_views(images, self.num_branches)
            trunks = [self._trunk(view, train=train) for view in views]
        branch_logits, branch_features = [], []
        for branch, (x, shared_features) in zip([self.student, *self.peers], trunks, strict=True):
            y, features = x, []
            if self.backprop_rescale:
                y = scale_gradient(x, 1.0 / self.num_branches)
            for index in range(self.first_branch_stage, len(branch.stages)):
                y = branch.run_stage(index, y, train=train)
                features.append(y)
            logits, features[-1] = branch.head(y, train=train)
            branch_logits.append(logits)
            branch_features.append(shared_features + features)
        out = dict(
            student_logits=branch_logits[0],
            student_features=branch_features[0],
            branch_logits=branch_logits,
            branch_features=branch_features,
        )
        if self.gate is not None:
            out["gate_weights"] = self.gate(x, train=train)
        if self.attention is not None:
            out["peer_attention"] = self.attention([f[-1] for f in branch_features[1:]])
        if self.peer_ensemble is not None:
            pooled = [global_avg_pool(f[-1]) for f in branch_features]
            out["peer_ensemble_logits"] = self.peer_ensemble(jnp.concatenate(pooled, axis=-1))
        return out

    def _trunk(self, images: jax.Array, *, train: bool):
        """The shared stem and stages: their last output and their stage maps."""
        x = self.student.stem(images, train=train)
        shared_features = []
        for index in range(self.first_branch_stage):
            x = self.student.run_stage(index, x, train=train)
            shared_features.append(x)
        return x, shared_features
