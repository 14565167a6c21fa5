"""PCL (Wu & Gong 2021): three branches, each on its own view (the trunk runs per view); a
peer-ensemble classifier over the branches' pooled features teaches every branch and learns
from its CE alone; every branch also distils from the other branches' temporal means:

    L = (branch methods' L, with t_i = the peer-ensemble classifier)
        + w(epoch) lam_temporal_kd sum_i mean_{j != i} KL_tau(z_i <- z~_j)

z~_j is branch j of the temporal mean, an EMA of the cohort's weights with its own BatchNorm
statistics (decay min(1 - 1/(t+1), temporal_mean_decay)), which PCL deploys. The temporal mean
is PCL's own state: saved with the checkpoint as `mean_params` and `mean_batch_stats`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ffcl_jax import losses
from ffcl_jax.errors import UserError
from ffcl_jax.methods.branches import BranchMethod, BranchSettings, ensemble_logits

ONLINE_STUDENT = "online_student"  # the trained branch 0, where `student` is the mean's


@dataclasses.dataclass(frozen=True)
class PCLSettings(BranchSettings):
    num_branches: int = 3
    lam_ensemble_ce: float = 1.0
    separate_views: bool = True
    peer_ensemble: bool = True
    temporal_mean_decay: float = 0.999  # 0: no temporal mean
    lam_temporal_kd: float = 1.0  # from the other branches' temporal means, ramped up


class PCL(BranchMethod):
    Settings = PCLSettings
    PRESETS = {"pcl": {}}

    def validate(self) -> None:
        super().validate()
        s = self.settings
        if s.lam_temporal_kd < 0:
            raise UserError(f"loss.lam_temporal_kd must be >= 0, got {s.lam_temporal_kd}")
        if not 0 <= s.temporal_mean_decay < 1:
            raise UserError(
                f"loss.temporal_mean_decay must be in [0, 1) (0: none), got {s.temporal_mean_decay}"
            )
        if s.lam_temporal_kd and not s.temporal_mean_decay:
            raise UserError(
                "loss.lam_temporal_kd distils from the temporal mean: set "
                "loss.temporal_mean_decay > 0 (PCL: 0.999), or loss.lam_temporal_kd=0"
            )

    @property
    def keeps_mean(self) -> bool:
        return self.settings.temporal_mean_decay > 0

    def extra_loss(self, outputs, terms, total, ramp):
        if self.settings.lam_temporal_kd:
            terms["kl_temporal_mean"] = losses.peer_mean_distillation(
                outputs["branch_logits"], outputs["mean_branch_logits"], self.settings.tau
            )
            total = total + ramp * self.settings.lam_temporal_kd * terms["kl_temporal_mean"]
        return total

    def evaluated(self, outputs, state_outputs=None):
        """With the temporal mean: the student and the branches are the mean's (what PCL
        deploys), the online student is `online_student`, and the ensemble is the online
        peer-ensemble classifier."""
        if state_outputs is None:
            return super().evaluated(outputs)
        logits = super().evaluated(state_outputs)
        logits["ensemble"] = ensemble_logits(outputs)
        logits[ONLINE_STUDENT] = outputs["student_logits"]
        return logits

    def evaluated_names(self):
        return super().evaluated_names() + ([ONLINE_STUDENT] if self.keeps_mean else [])

    # ----------------------------------------------------------------- the temporal mean

    def init_state(self, params, batch_stats):
        """The mean starts as a copy of the initial weights and statistics."""
        if not self.keeps_mean:
            return None
        copy = functools.partial(jax.tree.map, jnp.copy)
        return {"mean_params": copy(params), "mean_batch_stats": copy(batch_stats)}

    def state_outputs(self, state, images, model_of, *, train):
        """The mean runs on the same batch in training mode (its own BatchNorm statistics
        update; its logits are targets only)."""
        if state is None:
            return {}, None
        mean = model_of(state["mean_params"], state["mean_batch_stats"])
        logits = self.forward(mean, images, train=train)["branch_logits"]
        return {"mean_branch_logits": [jax.lax.stop_gradient(z) for z in logits]}, nnx.state(
            mean, nnx.BatchStat
        )

    def update_state(self, state, params, step, aux):
        """mean <- d mean + (1 - d) params, d = min(1 - 1/(step + 1), decay)."""
        if state is None:
            return None
        decay = jnp.minimum(1.0 - 1.0 / (step + 1), self.settings.temporal_mean_decay)
        mean_params = jax.tree.map(
            lambda mean, p: (decay * mean + (1 - decay) * p).astype(p.dtype),
            state["mean_params"],
            params,
        )
        return {"mean_params": mean_params, "mean_batch_stats": aux}

    def eval_state_outputs(self, state, images, model_of):
        if state is None:
            return None
        mean = model_of(state["mean_params"], state["mean_batch_stats"])
        return self.forward(mean, images, train=False)

    def deployed_weights(self, saved, kind):
        mean = saved.get(f"mean_{kind}")
        return mean if mean else saved[kind]
