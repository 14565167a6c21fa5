"""FFSD (Li et al., TNNLS 2022; the authors' code `SJLeo/FFSD`, read in
docs/baseline_sources/ffsd.md): two students learn from each other, the second is pushed away
from the first's attention and taught by a decoder, and a fusion module over their detached
last-stage maps teaches a third network, the leader, which is what FFSD deploys:

    L = sum_i [CE(z_i) + KL_tau(z_i <- z_j)]                       (students i = teacher, peer)
        + w lam_diversity [Div(f_peer <- f_teacher) + SD(f_peer <- dec_peer(d(f_teacher)))]
        + CE(z_F) + KL_tau(z_F <- (z_teacher + z_peer) / 2)             (the fusion module)
        + CE(z_L) + KL_tau(z_L <- z_F)
        + w lam_fusion [AT(f_L <- fused map) + AT(trans(f_L) <- [f_teacher, f_peer])
                        + SD(f_L <- dec_L(fused map))]                                (leader)
        + w lam_self_distillation sum_{dec, its network} [D(dec(f), f) + AT(dec(f), f)]

every target stopped, w the per-epoch warm-up. This project's pair maps onto FFSD's students:
the teacher (`config.teacher`) is student 1 of the authors' code, a `peer` network of
`config.student`'s architecture is student 2, and the leader, another `config.student`, is the
member named `student`: what a run reports as its student and `export` writes (docs/method.md,
"FFSD"). `--config.teacher=<the student's model>` gives the authors' three identical networks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ffcl_jax import losses
from ffcl_jax.errors import UserError
from ffcl_jax.methods.base import Method, OptimizerGroup
from ffcl_jax.methods.pair import check_tau_and_rampup
from ffcl_jax.models import create_model
from ffcl_jax.models.ffsd import Decoder, TransFusion
from ffcl_jax.models.fusion import FusionModule
from ffcl_jax.models.layers import at_least_float32

NETWORKS = ("teacher", "peer", "student")  # the two students, then the leader


@dataclasses.dataclass(frozen=True)
class FFSDSettings:
    """The authors' run script's values (docs/baseline_sources/ffsd.md, section 3)."""

    tau: float = 2.0  # options.py:47 (the README's command leaves it)
    lam_diversity: float = 1e-5  # the peer's diversity and self-distillation terms
    lam_fusion: float = 10.0  # the leader's three feature terms
    lam_self_distillation: float = 1000.0  # the decoders' own training terms
    rampup_epochs: float = 5.0  # the three lambdas: exp(-5 (1 - e/R)^2) up to epoch R
    # The authors count epochs from 1 (`--start_epoch 1`): the first epoch's weight is
    # exp(-5 (1 - 1/5)^2). 0 counts from 0, as the project's other ramp-ups.
    rampup_epoch_offset: float = 1.0
    decoder_learning_rate: float = 1e-3  # the decoders' Adam (PyTorch's default rate)
    diversity_fraction: float = 1 / 3  # the weakest positions the diversity term keeps


def _f(x):
    return at_least_float32(x)


def _attention(feature_map: jax.Array) -> jax.Array:
    """mean_channels(f^2), flattened per example, not normalised (NHWC)."""
    return jnp.mean(jnp.square(_f(feature_map)), axis=-1).reshape(feature_map.shape[0], -1)


def _kth_smallest_rule(attention: jax.Array, fraction: float):
    """(norm, normalised attention, the diversity target of the attention): positions above the
    k-th smallest (k = int(HW * fraction)) are pushed to norm - a, the others kept at a."""
    norm = jnp.linalg.norm(attention, axis=-1, keepdims=True)
    normalized = losses.l2_normalize(attention, axis=-1)
    k = int(attention.shape[-1] * fraction)
    threshold = jnp.sort(normalized, axis=-1)[:, k - 1 : k]
    target = (norm / 2 - normalized) * jnp.sign(normalized - threshold) + norm / 2
    return norm, normalized, target


def diversity(peer_map: jax.Array, other_map: jax.Array, fraction: float) -> jax.Array:
    """Div: mean over batch and positions of (a(f_peer) - t(f_other))^2, with `t` the other's
    attention mirrored at its strong positions (`_kth_smallest_rule`); the other is a target."""
    _, _, target = _kth_smallest_rule(_attention(jax.lax.stop_gradient(other_map)), fraction)
    peer = losses.l2_normalize(_attention(peer_map), axis=-1)
    return jnp.mean(jnp.square(peer - target))


def diversity_target(feature_map: jax.Array, fraction: float) -> jax.Array:
    """The map whose attention the diversity rule mirrors: f + (t - a) |a| / C on every channel
    (the decoder's input for the peer's self-distillation target; no gradient)."""
    f = jax.lax.stop_gradient(_f(feature_map))
    norm, normalized, target = _kth_smallest_rule(_attention(f), fraction)
    shift = ((target - normalized) * norm / f.shape[-1]).reshape(f.shape[:3])
    return f + shift[..., None]


def at_distance(student_map: jax.Array, target_map: jax.Array) -> jax.Array:
    """The authors' attention loss: mean over batch and positions of the squared difference of
    normalised attention maps, the target stopped."""
    return losses.attention_distance(student_map, target_map, reduction="mean")


def map_distance(decoded: jax.Array, target_map: jax.Array) -> jax.Array:
    """The same on whole maps (every channel and position normalised together)."""
    flat = decoded.reshape(decoded.shape[0], -1)
    target = jax.lax.stop_gradient(target_map).reshape(decoded.shape[0], -1)
    difference = losses.l2_normalize(_f(flat)) - losses.l2_normalize(_f(target))
    return jnp.mean(jnp.square(difference))


def self_distillation(features, decoded) -> jax.Array:
    """SD: the network's stages below the last learn the decoded maps' attention."""
    return sum(at_distance(f, d) for f, d in zip(features[:-1], decoded, strict=True))


def decoder_training(features, decoded) -> jax.Array:
    """A decoder's own loss: its maps from the network's last map against the network's earlier
    maps, whole and as attention."""
    return sum(
        map_distance(d, f) + losses.attention_distance(d, f, reduction="mean")
        for f, d in zip(features[:-1], decoded, strict=True)
    )


class FFSD(Method):
    Settings = FFSDSettings
    PRESETS = {"ffsd": {}}
    fusion_side_members = ("fusion",)  # the authors' fusion module: weight decay 1e-5

    def validate(self) -> None:
        s = self.settings
        check_tau_and_rampup(s)
        for name in ("lam_diversity", "lam_fusion", "lam_self_distillation"):
            if getattr(s, name) < 0:
                raise UserError(f"loss.{name} must be >= 0, got {getattr(s, name)}")
        if s.rampup_epoch_offset < 0:
            raise UserError(f"loss.rampup_epoch_offset must be >= 0, got {s.rampup_epoch_offset}")
        if s.decoder_learning_rate <= 0:
            raise UserError(
                f"loss.decoder_learning_rate must be > 0 (FFSD: 1e-3), got "
                f"{s.decoder_learning_rate}"
            )
        if not 0 < s.diversity_fraction < 1:
            raise UserError(
                f"loss.diversity_fraction must be in (0, 1) (FFSD: 1/3), got {s.diversity_fraction}"
            )

    # ----------------------------------------------------------------- members

    def build_members(self, config, num_classes, in_channels, dtype, rngs):
        """The two students, the leader, then the fusion module, the leader's trans-fusion head
        and the decoders of the peer and of the leader."""
        networks = {
            name: create_model(
                self.networks(config)[name],
                num_classes,
                in_channels=in_channels,
                dtype=dtype,
                rngs=rngs,
            )
            for name in NETWORKS
        }
        teacher, peer, leader = (networks[n] for n in NETWORKS)
        if teacher.stage_channels[-1] != peer.stage_channels[-1]:
            raise UserError(
                f"ffsd decodes the teacher's last map ({teacher.stage_channels[-1]} channels) "
                f"with the peer's decoder ({peer.stage_channels[-1]}): choose a teacher whose "
                "last stage has the student's channels (e.g. ResNets of any depth)"
            )
        concat = teacher.stage_channels[-1] + peer.stage_channels[-1]
        leader_channels = leader.stage_channels[-1]
        return {
            **networks,
            "fusion": FusionModule(
                teacher.stage_channels[-1],
                peer.stage_channels[-1],
                num_classes,
                fused_channels=leader_channels,
                dtype=dtype,
                rngs=rngs,
            ),
            "trans_fusion": TransFusion(leader_channels, concat, dtype=dtype, rngs=rngs),
            "decoder_peer": Decoder(peer.stage_channels, dtype=dtype, rngs=rngs),
            "decoder_student": Decoder(leader.stage_channels, dtype=dtype, rngs=rngs),
        }

    def networks(self, config):
        return {"student": config.student, "teacher": config.teacher, "peer": config.student}

    def optimizer_groups(self, config):
        """The networks (the leader's trans-fusion head with the leader) at the run's SGD, the
        fusion module at `fusion_weight_decay`, the decoders with Adam at their own rate and
        the networks' weight decay (CIFARTrainer.py:47-49, 59-61, 88, 100, 109-111)."""
        return {
            **super().optimizer_groups(config),
            "decoders": OptimizerGroup(
                config.weight_decay,
                optimizer="adam",
                learning_rate=self.settings.decoder_learning_rate,
            ),
        }

    def optimizer_group(self, member):
        if member.startswith("decoder_"):
            return "decoders"
        return super().optimizer_group(member)

    # ----------------------------------------------------------------- forward and objective

    def forward(self, cohort, images, *, train):
        out = {}
        for name in NETWORKS:
            out[f"{name}_logits"], out[f"{name}_features"] = cohort[name](images, train=train)
        stop = jax.lax.stop_gradient
        last_maps = [stop(out["teacher_features"][-1]), stop(out["peer_features"][-1])]
        fused_map = cohort.fusion.fuse(*last_maps, train=train)
        out["fused_logits"] = cohort.fusion.classify(fused_map)
        if not train:
            return out
        leader_last = out["student_features"][-1]
        out["trans_fusion_map"] = cohort.trans_fusion(leader_last, train=True)
        out["fusion_input"] = jnp.concatenate(last_maps, axis=-1)
        out["fused_map"] = stop(fused_map)
        # The decoders' targets first, in inference mode (their running statistics as they
        # were before this step), then their own training pass on their network's last map.
        fraction = self.settings.diversity_fraction
        decoded = cohort.decoder_peer(
            diversity_target(out["teacher_features"][-1], fraction), train=False
        )
        out["peer_sd_targets"] = [stop(d) for d in decoded]
        decoded = cohort.decoder_student(stop(fused_map), train=False)
        out["student_sd_targets"] = [stop(d) for d in decoded]
        for member, network in (("decoder_peer", "peer"), ("decoder_student", "student")):
            out[f"{member}_maps"] = cohort[member](stop(out[f"{network}_features"][-1]), train=True)
        return out

    def loss(self, outputs, labels, epoch, num_classes):
        s = self.settings
        z = {name: outputs[f"{name}_logits"] for name in (*NETWORKS, "fused")}
        f = {name: outputs[f"{name}_features"] for name in NETWORKS}
        ce = losses.cross_entropy
        terms = {
            "ce_teacher": ce(z["teacher"], labels),
            "ce_peer": ce(z["peer"], labels),
            "ce_student": ce(z["student"], labels),
            "ce_fused": ce(z["fused"], labels),
            "kl_teacher": losses.kl_distill(z["teacher"], z["peer"], s.tau),
            "kl_peer": losses.kl_distill(z["peer"], z["teacher"], s.tau),
            "kl_fused": losses.kl_distill(
                z["fused"], losses.ensemble_logits(z["teacher"], z["peer"]), s.tau
            ),
            "kl_student": losses.kl_distill(z["student"], z["fused"], s.tau),
        }
        total = sum(terms.values())
        ramp = losses.rampup_weight(epoch + s.rampup_epoch_offset, s.rampup_epochs)
        terms["rampup_weight"] = ramp
        weighted = (
            (
                s.lam_diversity,
                {
                    "diversity": diversity(f["peer"][-1], f["teacher"][-1], s.diversity_fraction),
                    "sd_peer": self_distillation(f["peer"], outputs["peer_sd_targets"]),
                },
            ),
            (
                s.lam_fusion,
                {
                    "at_fused_map": at_distance(f["student"][-1], outputs["fused_map"]),
                    "at_trans_fusion": at_distance(
                        outputs["trans_fusion_map"], outputs["fusion_input"]
                    ),
                    "sd_student": self_distillation(f["student"], outputs["student_sd_targets"]),
                },
            ),
            (
                s.lam_self_distillation,
                {
                    "decoder_peer": decoder_training(f["peer"], outputs["decoder_peer_maps"]),
                    "decoder_student": decoder_training(
                        f["student"], outputs["decoder_student_maps"]
                    ),
                },
            ),
        )
        for weight, group in weighted:
            terms.update(group)
            total = total + ramp * weight * sum(group.values())
        return total, terms

    def train_accuracy_logits(self, outputs):
        return {name: outputs[f"{name}_logits"] for name in (*NETWORKS, "fused")}

    def evaluated(self, outputs, state_outputs=None):
        """The leader (`student`), the two students, their ensemble (mean logits: the authors'
        "Ensemble Acc") and the fusion module."""
        z_t, z_p = outputs["teacher_logits"], outputs["peer_logits"]
        return {
            "student": outputs["student_logits"],
            "teacher": z_t,
            "peer": z_p,
            "ensemble": losses.ensemble_logits(z_t, z_p),
            "fused": outputs["fused_logits"],
        }

    def evaluated_names(self):
        return ["student", "teacher", "peer", "ensemble", "fused"]
