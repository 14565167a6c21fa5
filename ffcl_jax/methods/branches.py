"""The branch-based online distillation baselines: ONE, CL-ILR and OKDDip (docs/method.md,
"Branch baselines"), one multi-branch network of `config.student`:

    L = sum_i CE(z_i) + lam_ensemble_ce CE(z_ens) + w(epoch) lam_branch_kd sum_i KL_tau(z_i <- t_i)

with t_i the (gated) ensemble of the branches (ONE), the mean of the other branches (CL-ILR), or
OKDDip's two levels (each peer from its attention-weighted mix of the peers, branch 0, the
group leader, from the peers' mean); the branches' logits in a target receive no gradient.

The members: `student` is branch 0 together with the shared trunk, a whole zoo network (what a
run deploys); `peers` are branches 1..m-1, each a zoo network without the trunk; ONE's `gate`,
OKDDip's `attention` and PCL's `peer_ensemble` are heads (models/branches.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from ffcl_jax import losses
from ffcl_jax.errors import UserError
from ffcl_jax.methods.base import Method
from ffcl_jax.methods.pair import check_choice, check_tau_and_rampup
from ffcl_jax.models import NUM_STAGES, create_model
from ffcl_jax.models.branches import GATES, Gate, PeerAttention, drop_trunk, scale_gradient
from ffcl_jax.models.layers import dense, global_avg_pool, member_views

# What each branch distils from: the ensemble of all branches (ONE), the mean of the other
# branches' logits (CL-ILR's peer consensus), or OKDDip's attention-weighted peers.
BRANCH_TARGETS = ("ensemble", "others", "attention")


@dataclasses.dataclass(frozen=True)
class BranchSettings:
    num_branches: int = 3
    branch_stages: int = 1  # how many of the last stages each branch copies
    gate: str = "none"  # "one": ONE's gate weighs the branches' ensemble; "none": their mean
    backprop_rescale: bool = False  # CL-ILR: the trunk's gradient from the branches / m
    lam_ensemble_ce: float = 0.0  # CE(z_ens, y): trains ONE's gate (and, through it, branches)
    lam_branch_kd: float = 1.0  # sum_i KL_tau(z_i <- target_i), ramped up
    branch_target: str = "ensemble"  # one of BRANCH_TARGETS
    tau: float = 3.0
    rampup_epochs: float = 80.0
    # False: every KL term's target keeps its gradient, as CL-ILR's and OKDDip's public code
    # (no detach anywhere); True: targets teach only (docs/method.md, "Branch baselines").
    stop_target_gradient: bool = True
    separate_views: bool = False  # each branch trains on its own augmentation (PCL)
    peer_ensemble: bool = False  # PCL: the ensemble is a classifier over the pooled branches


class BranchMethod(Method):
    Settings = BranchSettings
    PRESETS = {
        # ONE (Lan et al. 2018): three branches of the last stage, a gate, CE on every branch and
        # the gated ensemble, the ensemble distilled to every branch.
        "one": dict(num_branches=3, gate="one", lam_ensemble_ce=1.0),
        # CL-ILR (Song & Chai 2018): branches on a shared trunk whose gradient is rescaled by
        # 1/m, each branch distilled from the mean of the other branches.
        "cl_ilr": dict(num_branches=4, backprop_rescale=True, branch_target="others"),
        # OKDDip (Chen et al. 2020): three peers and a group leader (branch 0, the student).
        "okddip": dict(num_branches=4, branch_target="attention"),
    }

    def validate(self) -> None:
        s = self.settings
        check_tau_and_rampup(s)
        if s.lam_ensemble_ce < 0 or s.lam_branch_kd < 0:
            raise UserError("loss.lam_ensemble_ce and loss.lam_branch_kd must be >= 0")
        check_choice("gate", s.gate, GATES)
        check_choice("branch_target", s.branch_target, BRANCH_TARGETS)
        if s.num_branches < 2:
            raise UserError(f"loss.num_branches must be >= 2, got {s.num_branches}")
        if not 1 <= s.branch_stages <= NUM_STAGES:
            raise UserError(f"loss.branch_stages must be in 1..{NUM_STAGES}, got {s.branch_stages}")
        if s.branch_target == "attention" and s.num_branches < 3:
            raise UserError("loss.branch_target='attention' needs loss.num_branches >= 3")
        if s.gate == "one" and s.branch_stages == NUM_STAGES:
            raise UserError("loss.gate='one' reads the shared trunk: set loss.branch_stages < 3")
        if s.gate == "one" and (s.peer_ensemble or s.separate_views):
            raise UserError(
                "loss.gate='one' weighs the branches from one shared trunk: it takes neither "
                "loss.peer_ensemble (another ensemble) nor loss.separate_views (a trunk per view)"
            )

    @property
    def num_views(self) -> int:
        return self.settings.num_branches if self.settings.separate_views else 1

    # ----------------------------------------------------------------- members

    def build_members(self, config, num_classes, in_channels, dtype, rngs):
        """Branch 0 and the trunk first, as `create_model` builds the network alone, so the
        student starts from the single network's initial weights."""
        s = self.settings

        def network():
            return create_model(
                config.student, num_classes, in_channels=in_channels, dtype=dtype, rngs=rngs
            )

        student = network()
        first = len(student.stages) - s.branch_stages
        peers = nnx.List([drop_trunk(network(), first) for _ in range(s.num_branches - 1)])
        gate = attention = ensemble = None
        if s.gate == "one":
            channels = student.stage_channels[first - 1]
            gate = Gate(channels, s.num_branches, dtype=dtype, rngs=rngs)
        if s.branch_target == "attention":
            attention = PeerAttention(student.stage_channels[-1], dtype=dtype, rngs=rngs)
        if s.peer_ensemble:
            channels = s.num_branches * student.stage_channels[-1]
            ensemble = dense(channels, num_classes, dtype=dtype, rngs=rngs)
        return dict(
            student=student, peers=peers, gate=gate, attention=attention, peer_ensemble=ensemble
        )

    def describe(self, config, num_params):
        return (
            f"student {config.student} ({num_params['student'] / 1e6:.2f}M) with "
            f"{self.settings.num_branches - 1} more branches ({num_params['peers'] / 1e6:.2f}M)"
        )

    # ----------------------------------------------------------------- forward and objective

    def forward(self, cohort, images, *, train):
        """Every branch's logits and stage maps; given a batch of views (PCL), the trunk runs
        once per view and branch i continues from view i."""
        s = self.settings
        student = cohort.student
        first = len(student.stages) - s.branch_stages
        if images.ndim == 4:  # one batch for every branch: the trunk runs once
            trunks = [_trunk(student, first, images, train=train)] * s.num_branches
        else:
            views = member_views(images, s.num_branches)
            trunks = [_trunk(student, first, view, train=train) for view in views]
        branch_logits, branch_features = [], []
        for branch, (x, shared_features) in zip([student, *cohort.peers], trunks, strict=True):
            y, features = x, []
            if s.backprop_rescale:
                y = scale_gradient(x, 1.0 / s.num_branches)
            for index in range(first, len(branch.stages)):
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
        if cohort.gate is not None:
            out["gate_weights"] = cohort.gate(x, train=train)
        if cohort.attention is not None:
            out["peer_attention"] = cohort.attention([f[-1] for f in branch_features[1:]])
        if cohort.peer_ensemble is not None:
            pooled = [global_avg_pool(f[-1]) for f in branch_features]
            out["peer_ensemble_logits"] = cohort.peer_ensemble(jnp.concatenate(pooled, axis=-1))
        return out

    def loss(self, outputs, labels, epoch, num_classes):
        s = self.settings
        branch_logits = outputs["branch_logits"]
        ensemble = ensemble_logits(outputs)
        terms = {"ce_branches": sum(losses.cross_entropy(z, labels) for z in branch_logits)}
        total = terms["ce_branches"]
        if s.lam_ensemble_ce:
            terms["ce_ensemble"] = losses.cross_entropy(ensemble, labels)
            total = total + s.lam_ensemble_ce * terms["ce_ensemble"]
        ramp = losses.rampup_weight(epoch, s.rampup_epochs)
        if s.lam_branch_kd:
            terms["kl_to_branches"] = self._branch_distillation(outputs, ensemble)
            total = total + ramp * s.lam_branch_kd * terms["kl_to_branches"]
        total = self.extra_loss(outputs, terms, total, ramp)
        terms["rampup_weight"] = ramp
        return total, terms

    def extra_loss(self, outputs, terms, total, ramp):
        """A subclass's further terms (PCL's temporal mean), added to `terms` and `total`."""
        return total

    def _branch_distillation(self, outputs, ensemble: jax.Array) -> jax.Array:
        """sum_i KL_tau(z_i <- t_i) for the settings' `branch_target`."""
        s = self.settings
        branch_logits, tau = outputs["branch_logits"], s.tau
        kl = losses.kl_distill if s.stop_target_gradient else losses.kl_to_learned_target
        if s.branch_target == "attention":  # OKDDip: branch 0 leads the peers
            leader, peers = branch_logits[0], branch_logits[1:]
            targets = losses.attention_targets(
                peers, outputs["peer_attention"], s.stop_target_gradient
            )
            peer_terms = sum(
                losses.kl_to_learned_target(z, t, tau) for z, t in zip(peers, targets, strict=True)
            )
            return peer_terms + kl(leader, losses.branch_ensemble(peers), tau)
        if s.branch_target == "others":
            targets = losses.mean_of_others(branch_logits)
        else:
            targets = [ensemble] * len(branch_logits)
        pairs = zip(branch_logits, targets, strict=True)
        return sum(kl(z, t, tau) for z, t in pairs)

    def evaluated(self, outputs, state_outputs=None):
        """The student (branch 0), the other branches (`branch_1`, ...) and the ensemble (for
        OKDDip the peers' mean without the leader, as the authors' code reports it)."""
        logits = {"student": outputs["student_logits"]}
        for index, z in enumerate(outputs["branch_logits"][1:], start=1):
            logits[f"branch_{index}"] = z
        if self.settings.branch_target == "attention":
            logits["ensemble"] = losses.branch_ensemble(outputs["branch_logits"][1:])
        else:
            logits["ensemble"] = ensemble_logits(outputs)
        return logits

    def evaluated_names(self):
        branches = [f"branch_{i}" for i in range(1, self.settings.num_branches)]
        return ["student", "ensemble", *branches]


def ensemble_logits(outputs) -> jax.Array:
    """A branch method's ensemble: PCL's peer-ensemble classifier where there is one, else the
    branches' (gated) mean."""
    if "peer_ensemble_logits" in outputs:
        return outputs["peer_ensemble_logits"]
    return losses.branch_ensemble(outputs["branch_logits"], outputs.get("gate_weights"))


def _trunk(network, first_branch_stage: int, images, *, train: bool):
    """The shared stem and stages: their last output and their stage maps."""
    x = network.stem(images, train=train)
    shared_features = []
    for index in range(first_branch_stage):
        x = network.run_stage(index, x, train=train)
        shared_features.append(x)
    return x, shared_features
