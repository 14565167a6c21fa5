"""MCL, mutual contrastive learning (Yang et al., AAAI 2022), as the authors' CIFAR code computes
it (docs/baseline_sources/mcl.md): two networks, each with an embedding head (Linear, ReLU,
Linear, L2 norm) on its pooled last-stage map, trained with

    L = CE(z_T) + CE(z_S) + w(epoch) (a VCL + g softVCL + b ICL + l softICL),

over the similarity matrices S_ij = e_i e_j^T / contrast_tau of the batch's embeddings:
VCL = C(S_TT) + C(S_SS) and ICL = C(S_TS) + C(S_ST), with C the supervised contrastive loss
(positives: the anchor's other same-class images; the anchor's own column out of the
denominator); softVCL = KD(S_TT <- sg S_SS) + KD(S_SS <- sg S_TT) and softICL =
KD(S_TS <- sg S_ST) + KD(S_ST <- sg S_TS), KD at temperature tau over whole rows. Batches are
class-balanced (`images_per_class`), so every anchor has a positive.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ffcl_jax import losses
from ffcl_jax.errors import UserError
from ffcl_jax.methods.pair import TeacherStudent, check_tau_and_rampup, pair_forward
from ffcl_jax.models.layers import at_least_float32, dense, global_avg_pool

NETWORKS = ("teacher", "student")
WEIGHTS = ("lam_vcl", "lam_soft_vcl", "lam_icl", "lam_soft_icl")


@dataclasses.dataclass(frozen=True)
class MCLSettings:
    """The authors' CIFAR scripts' values (their argparse defaults are all 0)."""

    lam_vcl: float = 0.1  # alpha: contrast within each network
    lam_soft_vcl: float = 1.0  # gamma: each network's similarity rows taught by the other's
    lam_icl: float = 0.1  # beta: contrast across the networks
    lam_soft_icl: float = 1.0  # lam: cross-network similarity rows taught by the other way round
    contrast_tau: float = 0.1  # temperature of every similarity matrix
    tau: float = 3.0  # temperature of the soft terms' KL
    embed_dim: int = 128
    rampup_epochs: float = 0.0  # the authors have none


class EmbeddingHead(nnx.Module):
    """Linear -> ReLU -> Linear -> x / ||x||_2 on a network's pooled last-stage map."""

    def __init__(self, in_features: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.hidden = dense(in_features, dim, dtype=dtype, rngs=rngs)
        self.out = dense(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, last_stage_map: jax.Array) -> jax.Array:
        x = self.out(nnx.relu(self.hidden(global_avg_pool(last_stage_map))))
        x = at_least_float32(x)
        return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))


def supervised_contrast(similarity: jax.Array, labels: jax.Array) -> jax.Array:
    """SupCon over rows of anchors: -mean_a mean_{p in P(a)} log softmax_{b != a}(S_a)_p, with
    P(a) the other images of a's class. An anchor without one in the batch (only without
    class-balanced batches; the authors' code divides 0 by 0 there) is left out of the mean."""
    n = similarity.shape[0]
    others = 1.0 - jnp.eye(n, dtype=similarity.dtype)
    positives = (labels[:, None] == labels[None, :]).astype(similarity.dtype) * others
    log_prob = similarity - jax.nn.logsumexp(similarity, axis=1, b=others, keepdims=True)
    count = positives.sum(1)
    has_positive = (count > 0).astype(similarity.dtype)
    per_anchor = (positives * log_prob).sum(1) / jnp.maximum(count, 1.0)
    return -(per_anchor * has_positive).sum() / jnp.maximum(has_positive.sum(), 1.0)


def similarities(embeddings: dict[str, jax.Array], contrast_tau: float) -> dict[str, jax.Array]:
    """S_ij = e_i e_j^T / contrast_tau for i, j in teacher (t), student (s)."""
    e_t, e_s = embeddings["teacher"], embeddings["student"]
    s_ts = e_t @ e_s.T / contrast_tau
    return {
        "tt": e_t @ e_t.T / contrast_tau,
        "ss": e_s @ e_s.T / contrast_tau,
        "ts": s_ts,
        "st": s_ts.T,
    }


def mcl_terms(embeddings, labels, settings: MCLSettings) -> dict[str, jax.Array]:
    """The four contrastive terms (those with a non-zero weight), unweighted."""
    s = settings
    sim = similarities(embeddings, s.contrast_tau)
    terms = {}
    if s.lam_vcl:
        terms["vcl"] = supervised_contrast(sim["tt"], labels) + supervised_contrast(
            sim["ss"], labels
        )
    if s.lam_soft_vcl:
        terms["soft_vcl"] = losses.kl_distill(sim["tt"], sim["ss"], s.tau) + losses.kl_distill(
            sim["ss"], sim["tt"], s.tau
        )
    if s.lam_icl:
        terms["icl"] = supervised_contrast(sim["ts"], labels) + supervised_contrast(
            sim["st"], labels
        )
    if s.lam_soft_icl:
        terms["soft_icl"] = losses.kl_distill(sim["ts"], sim["st"], s.tau) + losses.kl_distill(
            sim["st"], sim["ts"], s.tau
        )
    return terms


def smallest_images_per_class(batch_size: int, num_classes: int) -> int:
    """The fewest images a class, at least 2 (one positive per anchor), that fit a batch into
    the data set's classes: 2 for CIFAR-100's 128 (64 classes x 2, the authors'), 16 for
    Fashion-MNIST's (8 x 16)."""
    for m in range(2, batch_size + 1):
        if batch_size % m == 0 and batch_size // m <= num_classes:
            return m
    return batch_size


class MCL(TeacherStudent):
    Settings = MCLSettings
    PRESETS = {"mcl": {}}

    def validate(self) -> None:
        s = self.settings
        for name in WEIGHTS:
            if getattr(s, name) < 0:
                raise UserError(f"loss.{name} must be >= 0, got {getattr(s, name)}")
        check_tau_and_rampup(s)
        if s.contrast_tau <= 0:
            raise UserError(f"loss.contrast_tau must be > 0, got {s.contrast_tau}")
        if s.embed_dim < 1:
            raise UserError(f"loss.embed_dim must be >= 1, got {s.embed_dim}")

    def images_per_class(self, config, num_classes):
        """`config.images_per_class`, or when unset the authors' structure as far as the data
        set's classes allow (`smallest_images_per_class`)."""
        chosen = config.get("images_per_class")
        if chosen is not None:
            return chosen
        return smallest_images_per_class(config.batch_size, num_classes)

    def build_members(self, config, num_classes, in_channels, dtype, rngs):
        members = super().build_members(config, num_classes, in_channels, dtype, rngs)
        for name in NETWORKS:
            members[f"{name}_embed"] = EmbeddingHead(
                members[name].stage_channels[-1], self.settings.embed_dim, dtype=dtype, rngs=rngs
            )
        return members

    def forward(self, cohort, images, *, train):
        out = pair_forward(cohort, images, train=train)
        if train:  # the embeddings only teach
            out["embeddings"] = {
                name: cohort[f"{name}_embed"](out[f"{name}_features"][-1]) for name in NETWORKS
            }
        return out

    def loss(self, outputs, labels, epoch, num_classes):
        s = self.settings
        terms = {
            "ce_teacher": losses.cross_entropy(outputs["teacher_logits"], labels),
            "ce_student": losses.cross_entropy(outputs["student_logits"], labels),
        }
        contrast = mcl_terms(outputs["embeddings"], labels, s)
        weighted = sum(
            (getattr(s, f"lam_{k}") * v for k, v in contrast.items()), jnp.zeros((), jnp.float32)
        )
        ramp = losses.rampup_weight(epoch, s.rampup_epochs)
        total = terms["ce_teacher"] + terms["ce_student"] + ramp * weighted
        terms.update(contrast)
        terms["rampup_weight"] = ramp
        return total, terms
