"""Loss terms of FFCL and its baselines (docs/method.md, "Loss"), one small function each.

Conventions every term follows (docs/method.md, "Known traps"):
- distillation targets are wrapped in `stop_gradient`: a KD target is never trained toward its
  student;
- KL is summed over classes and averaged over the batch (never a mean over classes), and scaled
  by tau^2 so that gradient magnitudes do not shrink with the temperature;
- softmax / log-softmax / KL run in float32 whatever the compute dtype, since bf16 logits
  overflow in `exp` and underflow in the target probabilities (in float64 when the compute dtype
  is float64: a run for exact comparisons keeps its precision throughout).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from ffcl_jax.models.layers import at_least_float32 as _f32
from ffcl_jax.models.layers import avg_pool_to


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(_f32(logits), labels).mean()


def kl_distill(student_logits: jax.Array, target_logits: jax.Array, tau: float) -> jax.Array:
    """`KL_tau(student <- target)`: tau^2 * mean_batch sum_classes q (log q - log p).

    `q = softmax(stop_gradient(target) / tau)` is the teacher's distribution and receives no
    gradient; `p = softmax(student / tau)` is the one being trained.
    """
    return kl_to_learned_target(student_logits, jax.lax.stop_gradient(target_logits), tau)


def ensemble_logits(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
    """z_E = (z_T + z_S) / 2, the ensemble that teaches the fused classifier."""
    return (_f32(teacher_logits) + _f32(student_logits)) / 2.0


def branch_ensemble(branch_logits: Sequence[jax.Array], gate_weights=None) -> jax.Array:
    """z_ens = sum_i g_i z_i over the branches, with ONE's per-example gate weights `g` (shape
    batch x branches), or their plain mean without a gate. Not stopped: the gate learns from
    CE(z_ens); where z_ens teaches, `kl_distill` stops it."""
    stacked = jnp.stack([_f32(z) for z in branch_logits], axis=1)  # batch, branches, classes
    if gate_weights is None:
        return jnp.mean(stacked, axis=1)
    return jnp.sum(_f32(gate_weights)[..., None] * stacked, axis=1)


def mean_of_others(branch_logits: Sequence[jax.Array]) -> list[jax.Array]:
    """For each branch i, (sum_{j != i} z_j) / (m - 1): CL-ILR's target, the other branches'
    consensus, so that no branch is distilled toward itself."""
    stacked = jnp.stack([_f32(z) for z in branch_logits])
    total = jnp.sum(stacked, axis=0)
    return [(total - z) / (len(branch_logits) - 1) for z in stacked]


def min_logit_ensemble(member_logits: Sequence[jax.Array], labels: jax.Array) -> jax.Array:
    """KDCL's MinLogit target: each member's logits less its true-class logit (so every member
    scores the true class 0), then the element-wise minimum over the members: for every wrong
    class, the member that separates it from the true class the most."""
    stacked = jnp.stack([_f32(z) for z in member_logits])  # members, batch, classes
    true_class = jnp.take_along_axis(stacked, labels[None, :, None].astype(jnp.int32), axis=-1)
    return jnp.min(stacked - true_class, axis=0)


def peer_mean_distillation(
    branch_logits: Sequence[jax.Array], mean_logits: Sequence[jax.Array], tau: float
) -> jax.Array:
    """PCL's temporal-mean term: sum_i mean_{j != i} KL_tau(z_i <- sg(z~_j)), each branch taught
    by the temporal means (`mean_logits`) of the other branches, never its own."""
    m = len(branch_logits)
    return sum(
        sum(kl_distill(z, mean_logits[j], tau) for j in range(m) if j != i) / (m - 1)
        for i, z in enumerate(branch_logits)
    )


def attention_targets(
    peer_logits: Sequence[jax.Array], attention: jax.Array, stop_gradient: bool = True
) -> jax.Array:
    """OKDDip's targets, peers x batch x classes: t_a = sum_b attention[:, a, b] sg(z_b). The
    peers' logits are stopped (a target is not trained toward its student; `stop_gradient=False`
    keeps their gradient, as the authors' code does); the attention is not, since these targets
    are the only thing it learns from (docs/method.md)."""
    stop = jax.lax.stop_gradient if stop_gradient else (lambda z: z)
    stacked = jnp.stack([_f32(stop(z)) for z in peer_logits], axis=1)
    return jnp.moveaxis(jnp.einsum("bpq,bqc->bpc", _f32(attention), stacked), 1, 0)


def kl_to_learned_target(student_logits: jax.Array, target_logits: jax.Array, tau: float):
    """`kl_distill` whose target keeps its gradient: for a target built by a module that learns
    only from this term (OKDDip's attention), with whatever must not learn already stopped."""
    target_log_probs = jax.nn.log_softmax(_f32(target_logits) / tau)
    student_log_probs = jax.nn.log_softmax(_f32(student_logits) / tau)
    per_example = jnp.sum(
        jnp.exp(target_log_probs) * (target_log_probs - student_log_probs), axis=-1
    )
    return (tau**2) * per_example.mean()


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """`x / max(||x||_2, 1e-12)` along `axis`, as `torch.nn.functional.normalize`.

    Where `x` is exactly zero (a stage map that a ReLU zeroed for one example, a position where
    every channel of a fused map is zero) the result is 0 and so is its gradient: the norm's own
    gradient there would be 0/0 = NaN, so the norm never sees the zero vector. Elsewhere the
    forward pass and the gradient are bit for bit those of `jnp.linalg.norm` on `x`.
    """
    nonzero = jnp.any(x != 0, axis=axis, keepdims=True)
    norm = jnp.linalg.norm(jnp.where(nonzero, x, 1.0), axis=axis, keepdims=True)
    return x / jnp.maximum(jnp.where(nonzero, norm, 0.0), 1e-12)


def attention_map(feature_map: jax.Array) -> jax.Array:
    """a(f) = l2_normalize(mean_channels(f^2)), flattened per example (Zagoruyko & Komodakis)."""
    energy = jnp.mean(jnp.square(_f32(feature_map)), axis=-1).reshape(feature_map.shape[0], -1)
    return l2_normalize(energy, axis=-1)


ATTENTION_REDUCTIONS = ("sum", "mean")


def attention_distance(
    student_map: jax.Array, teacher_map: jax.Array, reduction: str = "sum"
) -> jax.Array:
    """mean_batch || a(f_S) - stop_gradient(a(f_T)) ||_2^2, pooling the larger map first.

    `reduction="sum"` sums the squared difference over the H*W positions of the stage, so a
    stage's weight grows with its resolution (a 28x28 stage counts 16x a 7x7 one); `"mean"`
    averages over positions instead, which weights every stage equally: RepDistiller's
    attention loss (`(at(f_s) - at(f_t)).pow(2).mean()`, used there with beta = 1000).
    """
    size = (
        min(student_map.shape[1], teacher_map.shape[1]),
        min(student_map.shape[2], teacher_map.shape[2]),
    )
    student_attention = attention_map(avg_pool_to(student_map, size))
    teacher_attention = jax.lax.stop_gradient(attention_map(avg_pool_to(teacher_map, size)))
    per_example = jnp.sum(jnp.square(student_attention - teacher_attention), axis=-1)
    if reduction == "mean":
        per_example = per_example / student_attention.shape[-1]
    return per_example.mean()


def attention_transfer(
    student_features: Sequence[jax.Array],
    teacher_features: Sequence[jax.Array],
    stages: Sequence[int],
    direction: str,
    reduction: str = "sum",
) -> jax.Array:
    """L_feat = sum over the listed stages of the attention distance.

    `teacher_to_student` trains only the student toward the teacher's maps; `mutual` adds the
    reverse term, so each network learns the other's attention.
    """
    total = jnp.zeros((), jnp.float32)
    for stage in stages:
        total += attention_distance(student_features[stage], teacher_features[stage], reduction)
        if direction == "mutual":
            total += attention_distance(teacher_features[stage], student_features[stage], reduction)
    return total


def fused_map_distance(adapted_map: jax.Array, fused_map: jax.Array) -> jax.Array:
    """mean_batch mean_positions || n(A(f)) - stop_gradient(n(F)) ||_2^2, n normalising the
    channel vector at each position to unit L2 norm.

    `adapted_map` is a network's stage map after its learned 1x1 adapter, `fused_map` the fusion
    module's map of that stage (after its 1x1 convolution, BatchNorm and ReLU; the map it pools),
    which is only a target. Normalising per position makes the distance (2 - 2 cos, in [0, 4])
    blind to the scale of either map: the fused map's scale follows its BatchNorm's learned
    gamma and the adapter's is arbitrary, and a plain MSE would let either drift set the term's
    weight. Averaging over positions keeps every stage's term on the same scale.
    """
    if adapted_map.shape != fused_map.shape:
        raise ValueError(
            f"adapted map {adapted_map.shape} and fused map {fused_map.shape} must match"
        )
    target = jax.lax.stop_gradient(l2_normalize(_f32(fused_map), axis=-1))
    difference = l2_normalize(_f32(adapted_map), axis=-1) - target
    per_example = jnp.mean(jnp.sum(jnp.square(difference), axis=-1), axis=(1, 2))
    return per_example.mean()


def fused_map_transfer(feature_targets: Sequence[Mapping[str, jax.Array]]) -> jax.Array:
    """Sum over the taught stages of the fused map's distance to each network's adapted map.

    Each entry of `feature_targets` (what `Cohort` returns for a fused feature form) holds one
    stage's `fused` map and the `teacher` and `student` maps after their adapters: the fused
    map teaches both networks.
    """
    total = jnp.zeros((), jnp.float32)
    for maps in feature_targets:
        total += fused_map_distance(maps["teacher"], maps["fused"])
        total += fused_map_distance(maps["student"], maps["fused"])
    return total


def virtual_teacher_target(
    labels: jax.Array, num_classes: int, correct_prob: float, temperature: float
) -> jax.Array:
    """Tf-KD_reg's always-right teacher: softmax(p_d / T) with p_d = a on the true class and
    (1 - a) / (K - 1) elsewhere."""
    wrong_prob = (1.0 - correct_prob) / (num_classes - 1)
    p_d = jnp.where(jax.nn.one_hot(labels, num_classes) > 0, correct_prob, wrong_prob)
    return jax.nn.softmax(p_d / temperature, axis=-1)


def label_smoothing_target(labels: jax.Array, num_classes: int, epsilon: float) -> jax.Array:
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), epsilon)


def fixed_target_kl(logits: jax.Array, target_probs: jax.Array) -> jax.Array:
    """R(z) = mean_batch KL(target || softmax(z)) against a fixed, label-derived target."""
    log_probs = jax.nn.log_softmax(_f32(logits))
    target = jax.lax.stop_gradient(_f32(target_probs))
    per_example = jnp.sum(jax.scipy.special.xlogy(target, target) - target * log_probs, axis=-1)
    return per_example.mean()


def rampup_weight(epoch: jax.Array, rampup_epochs: float) -> jax.Array:
    """w(epoch) = exp(-5 (1 - min(epoch, R) / R)^2), the sigmoid ramp-up of FFL/ONE; R = 0 -> 1."""
    if rampup_epochs <= 0:
        return jnp.ones((), jnp.float32)
    # The default float type: float32, or float64 when 64-bit JAX is on (a float64 run).
    progress = jnp.minimum(jnp.asarray(epoch, jnp.result_type(float)), rampup_epochs)
    progress = progress / rampup_epochs
    return jnp.exp(-5.0 * jnp.square(1.0 - progress))


def top1_correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example 1.0 where the arg-max class is the label."""
    return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
