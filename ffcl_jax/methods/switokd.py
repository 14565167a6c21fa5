"""SwitOKD (Qian et al., ECCV 2022): a teacher and a student distil from each other, and the
teacher pauses ("expert mode") while the distillation gap is past an adaptive threshold:

    L = CE(z_S) + KL_tau(z_S <- z_T) + [learning mode] (CE(z_T) + KL_tau(z_T <- z_S))

    G = mean_b ||p_T - p_S||_1,   d_S = mean_b ||p_S - y||_1,   d_T = mean_b ||p_T - y||_1,
    delta = d_S - exp(-d_T / (d_S + d_T)) d_T,
    expert mode iff G > delta and d_T < d_S  (the second condition: the authors' code only),

with p = softmax(z / switch_tau) of the stopped logits, means over the (global) batch. In expert
mode the teacher takes no update: its parameters and momentum stay as they were
(`Method.member_updates`; its BatchNorm statistics move with its training-mode pass, as in the
authors' code). The student learns at `student_lr_scale` times the rate.
docs/baseline_sources/switokd.md has the authors' code with file:line; docs/method.md, "SwitOKD",
what we follow and why.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ffcl_jax import losses
from ffcl_jax.errors import UserError
from ffcl_jax.methods.pair import TeacherStudent, check_tau_and_rampup, pair_forward
from ffcl_jax.models.layers import at_least_float32


@dataclasses.dataclass(frozen=True)
class SwitOKDSettings:
    tau: float = 1.0  # of both KL terms (scaled by tau^2: 1 at the authors' tau 1)
    switch_tau: float = 1.0  # of the switch's distributions (the paper's p^tau; code: 1)
    # The code's extra condition: pause only while the teacher is closer to the labels.
    require_teacher_ahead: bool = True
    student_lr_scale: float = 0.1  # the student's rate / the teacher's (CIFAR-100 script)
    # SwitOKD has no ramp-up; the key is accepted because protocols set it for every method.
    rampup_epochs: float = 0.0


def l1_to_labels(logits: jax.Array, labels: jax.Array, tau: float) -> jax.Array:
    """mean_b ||softmax(sg(z) / tau) - onehot(y)||_1."""
    p = jax.nn.softmax(jax.lax.stop_gradient(at_least_float32(logits)) / tau, axis=-1)
    y = jax.nn.one_hot(labels, p.shape[-1], dtype=p.dtype)
    return jnp.mean(jnp.sum(jnp.abs(p - y), axis=-1))


def distillation_gap(z_t: jax.Array, z_s: jax.Array, tau: float) -> jax.Array:
    """G = mean_b ||softmax(sg(z_T) / tau) - softmax(sg(z_S) / tau)||_1."""
    p_t, p_s = (
        jax.nn.softmax(jax.lax.stop_gradient(at_least_float32(z)) / tau, axis=-1)
        for z in (z_t, z_s)
    )
    return jnp.mean(jnp.sum(jnp.abs(p_t - p_s), axis=-1))


def switch_threshold(student_distance: jax.Array, teacher_distance: jax.Array) -> jax.Array:
    """delta = d_S - exp(-d_T / (d_S + d_T)) d_T."""
    total = student_distance + teacher_distance
    return student_distance - jnp.exp(-teacher_distance / total) * teacher_distance


class SwitOKD(TeacherStudent):
    Settings = SwitOKDSettings
    PRESETS = {"switokd": {}}

    def validate(self) -> None:
        s = self.settings
        check_tau_and_rampup(s)
        if s.switch_tau <= 0:
            raise UserError(f"loss.switch_tau must be > 0, got {s.switch_tau}")
        if s.student_lr_scale <= 0:
            raise UserError(
                f"loss.student_lr_scale must be > 0 (1: the teacher's rate), got "
                f"{s.student_lr_scale}"
            )

    def learning_rate_scales(self):
        return {"student": self.settings.student_lr_scale}

    def forward(self, cohort, images, *, train):
        return pair_forward(cohort, images, train=train)

    def loss(self, outputs, labels, epoch, num_classes):
        """Both networks' objectives, every switch quantity as a term; the teacher's part of
        the total is what expert mode drops (`member_updates` pauses its update)."""
        s = self.settings
        z_t, z_s = outputs["teacher_logits"], outputs["student_logits"]
        terms = {
            "ce_teacher": losses.cross_entropy(z_t, labels),
            "ce_student": losses.cross_entropy(z_s, labels),
            "kl_student_to_teacher": losses.kl_distill(z_t, z_s, s.tau),
            "kl_teacher_to_student": losses.kl_distill(z_s, z_t, s.tau),
            "switch_gap": distillation_gap(z_t, z_s, s.switch_tau),
            "switch_student_l1": l1_to_labels(z_s, labels, s.switch_tau),
            "switch_teacher_l1": l1_to_labels(z_t, labels, s.switch_tau),
        }
        terms["switch_threshold"] = switch_threshold(
            terms["switch_student_l1"], terms["switch_teacher_l1"]
        )
        total = sum(terms[k] for k in ("ce_teacher", "ce_student")) + sum(
            terms[k] for k in ("kl_student_to_teacher", "kl_teacher_to_student")
        )
        return total, terms

    def member_updates(self, terms):
        """The teacher learns unless in expert mode. From the terms' batch means (the global
        batch's, in the generic step): delta is recomputed from the two distances, not read off
        the logged threshold (a mean of per-device thresholds under per-device BatchNorm)."""
        d_s, d_t = terms["switch_student_l1"], terms["switch_teacher_l1"]
        expert = terms["switch_gap"] > switch_threshold(d_s, d_t)
        if self.settings.require_teacher_ahead:
            expert = expert & (d_t < d_s)
        return {"teacher": jnp.logical_not(expert)}
