"""Loss terms of FFCL and its baselines (FFCL_METHOD.md section 3), one small function each.

Conventions every term follows (the traps of section 6):
- distillation targets are wrapped in `stop_gradient`: a KD target is never trained toward its
  student;
- KL is summed over classes and averaged over the batch (never a mean over classes), and scaled
  by tau^2 so that gradient magnitudes do not shrink with the temperature;
- softmax / log-softmax / KL run in float32 whatever the compute dtype, since bf16 logits
  overflow in `exp` and underflow in the target probabilities (in float64 when the compute dtype
  is float64: a run for exact comparisons keeps its precision throughout).
"""

from __future__ import annotations

from collections.abc import Sequence

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
    target_log_probs = jax.nn.log_softmax(_f32(jax.lax.stop_gradient(target_logits)) / tau)
    student_log_probs = jax.nn.log_softmax(_f32(student_logits) / tau)
    per_example = jnp.sum(
        jnp.exp(target_log_probs) * (target_log_probs - student_log_probs), axis=-1
    )
    return (tau**2) * per_example.mean()


def ensemble_logits(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
    """z_E = (z_T + z_S) / 2, the ensemble that teaches the fused classifier."""
    return (_f32(teacher_logits) + _f32(student_logits)) / 2.0


def attention_map(feature_map: jax.Array) -> jax.Array:
    """a(f) = l2_normalize(mean_channels(f^2)), flattened per example (Zagoruyko & Komodakis).

    The epsilon matches `torch.nn.functional.normalize` (1e-12 on the norm).
    """
    energy = jnp.mean(jnp.square(_f32(feature_map)), axis=-1).reshape(feature_map.shape[0], -1)
    norm = jnp.linalg.norm(energy, axis=-1, keepdims=True)
    return energy / jnp.maximum(norm, 1e-12)


def attention_distance(student_map: jax.Array, teacher_map: jax.Array) -> jax.Array:
    """mean_batch || a(f_S) - stop_gradient(a(f_T)) ||_2^2, pooling the larger map first."""
    size = (
        min(student_map.shape[1], teacher_map.shape[1]),
        min(student_map.shape[2], teacher_map.shape[2]),
    )
    student_attention = attention_map(avg_pool_to(student_map, size))
    teacher_attention = jax.lax.stop_gradient(attention_map(avg_pool_to(teacher_map, size)))
    return jnp.sum(jnp.square(student_attention - teacher_attention), axis=-1).mean()


def attention_transfer(
    student_features: Sequence[jax.Array],
    teacher_features: Sequence[jax.Array],
    stages: Sequence[int],
    direction: str,
) -> jax.Array:
    """L_feat = sum over the listed stages of the attention distance.

    `teacher_to_student` trains only the student toward the teacher's maps; `mutual` adds the
    reverse term, so each network learns the other's attention.
    """
    total = jnp.zeros((), jnp.float32)
    for stage in stages:
        total += attention_distance(student_features[stage], teacher_features[stage])
        if direction == "mutual":
            total += attention_distance(teacher_features[stage], student_features[stage])
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
