"""What a method is: the one object the generic trainer asks everything method-specific.

A method answers, in its own module: its settings (a frozen dataclass whose field defaults are
its defaults, validated in `validate`), the members of its cohort (which networks and heads,
which are frozen, which take the fusion side's weight decay, which input view each sees), its
forward pass and objective (the total and its named terms: what a run logs), which models a run
evaluates, which member `export` deploys, and any state it keeps besides the parameters (PCL's
temporal mean). `train.py`, `steps.py`, `checkpoint.py`, `export.py` and `report.py` call only
this interface.

Settings are static under `jit`: terms whose weight is zero are not traced at all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
from flax import nnx

from ffcl_jax.errors import UserError

# A method's outputs and its per-member views are plain dicts of arrays (and lists of arrays).
Outputs = dict[str, Any]
# `model_of(params, batch_stats)`: the cohort with other weights (a method's own state, such as
# PCL's temporal mean, is a second set of the cohort's weights).
ModelOf = Callable[[Any, Any], nnx.Module]
OPTIMIZERS = ("sgd", "adam")


@dataclasses.dataclass(frozen=True)
class OptimizerGroup:
    """How one group of a cohort's members is updated (`Method.optimizer_groups`). Every group
    follows the run's schedule (its warm-up and its decays at `config.lr_decay_epochs`) from its
    own base rate; weight decay is L2 added to the gradient, as PyTorch's `weight_decay`.

    `optimizer`: "sgd" (the run's `config.momentum` and `config.nesterov`) or "adam" (PyTorch's
    Adam: `adam_b1`, `adam_b2`, `adam_eps`). `learning_rate`: the group's base rate (None: the
    run's `config.learning_rate`); a per-member rate is a group of its own."""

    weight_decay: float
    optimizer: str = "sgd"
    learning_rate: float | None = None
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8

    def base_rate(self, config) -> float:
        return config.learning_rate if self.learning_rate is None else self.learning_rate


class Cohort(nnx.Module):
    """The members a method trains together, by name: networks and heads (fusion module, gate,
    attention, ...). Splitting it gives one parameter tree whose top-level keys are the member
    names, which is what weight-decay groups, frozen members, checkpoints and export key on.
    A member that is None (an optional head a setting turns off) holds no parameters."""

    def __init__(self, members: Mapping[str, nnx.Module | None]):
        self.member_names = tuple(members)
        for name, member in members.items():
            setattr(self, name, member)

    def __getitem__(self, name: str) -> nnx.Module | None:
        return getattr(self, name)


class Method:
    """Base class of every method; a method module subclasses it and registers its name(s) in
    `ffcl_jax.methods.REGISTRY`. Only `Settings`, `build_members`, `forward`, `loss` and
    `evaluated` are required; the rest has defaults that fit a method without state of its own."""

    Settings: ClassVar[type]
    # Per registered name: the values that differ from `Settings`' defaults (a family of methods
    # in one module, such as independent/DML/FFL/FFCL, registers several names).
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    # The member `export` writes and a run's `student` column is: a whole zoo network.
    deployed: ClassVar[str] = "student"
    # Members that are loaded, not trained: zero updates, no optimizer state, inference mode.
    frozen_members: ClassVar[tuple[str, ...]] = ()
    # Members that take `config.fusion_weight_decay`; every other member takes `weight_decay`
    # (the default `optimizer_groups`).
    fusion_side_members: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, settings):
        self.name = name
        self.settings = settings

    # ----------------------------------------------------------------- settings

    @classmethod
    def create(
        cls,
        name: str,
        overrides: Mapping[str, Any] | None = None,
        protocol_rampup_epochs: float | None = None,
    ) -> Method:
        """The method `name` with its preset and every non-None entry of `overrides` (usually
        `config.loss`) on top; a key this method does not have is an error naming its keys.

        `protocol_rampup_epochs` (`config.protocol_rampup_epochs`, a protocol's compressed
        schedule) replaces the ramp-up of a method that has one; a method without a ramp-up
        keeps none, and `loss.rampup_epochs` overrides both."""
        fields = {f.name: f for f in dataclasses.fields(cls.Settings)}
        values = dict(cls.PRESETS.get(name, {}))
        if protocol_rampup_epochs is not None and "rampup_epochs" in fields:
            if values.get("rampup_epochs", fields["rampup_epochs"].default) > 0:
                values["rampup_epochs"] = float(protocol_rampup_epochs)
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key not in fields:
                raise UserError(
                    f"method {name!r} has no setting loss.{key}; its settings: "
                    f"{', '.join(sorted(fields))} (leave the others unset)"
                )
            values[key] = value
        method = cls(name, cls.Settings(**cls.normalize(values)))
        method.validate()
        return method

    @classmethod
    def normalize(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Values as the settings hold them (a list from the command line as a tuple, ...)."""
        return values

    def validate(self) -> None:
        """Raises `UserError` for settings that cannot run, saying what to set."""

    def check_config(self, config) -> None:
        """Checks of the rest of the config that only this method needs."""
        if config.teacher_checkpoint:
            raise UserError(
                f"config.teacher_checkpoint is only read by method 'kd', not {self.name!r}; "
                "unset it"
            )

    def settings_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.settings)

    # ----------------------------------------------------------------- members

    def build_members(
        self, config, num_classes: int, in_channels: int, dtype, rngs: nnx.Rngs
    ) -> dict[str, nnx.Module | None]:
        """The cohort's members in the order they are created (which fixes their initial
        weights for a seed)."""
        raise NotImplementedError

    def optimizer_groups(self, config) -> dict[str, OptimizerGroup]:
        """The cohort's optimizer groups by name, in order (a trainable member is in one, named
        by `optimizer_group`). The default: the run's SGD for every member, `weight_decay` on the
        networks and `fusion_weight_decay` on `fusion_side_members`."""
        return {
            "members": OptimizerGroup(config.weight_decay),
            "fusion_side": OptimizerGroup(config.fusion_weight_decay),
        }

    def optimizer_group(self, member: str) -> str:
        """The name of the optimizer group of a trainable member (frozen ones have none)."""
        return "fusion_side" if member in self.fusion_side_members else "members"

    def networks(self, config) -> dict[str, str]:
        """The members that are whole zoo networks, with their zoo names (what export can write
        and the run's header shows)."""
        return {self.deployed: config.student}

    @property
    def num_views(self) -> int:
        """Augmented views of every training image the input pipeline makes (1: one batch)."""
        return 1

    def images_per_class(self, config, num_classes: int) -> int:
        """Images of each class in a class-balanced training batch (`config.images_per_class`;
        0: shuffled batches). A method that needs such batches chooses when it is None."""
        del num_classes
        return config.get("images_per_class") or 0

    def describe(self, config, num_params: Mapping[str, int]) -> str:
        """The run header's words for the cohort."""
        return " | ".join(
            f"{member} {network} ({num_params[member] / 1e6:.2f}M)"
            for member, network in self.networks(config).items()
        )

    # ----------------------------------------------------------------- forward and objective

    def forward(self, cohort: Cohort, images: jax.Array, *, train: bool) -> Outputs:
        raise NotImplementedError

    def loss(
        self, outputs: Outputs, labels: jax.Array, epoch: jax.Array, num_classes: int
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The total loss and its named terms (what a run logs beside the total)."""
        raise NotImplementedError

    def member_updates(self, terms: Mapping[str, jax.Array]) -> dict[str, jax.Array] | None:
        """Which members take this step's update: a boolean scalar per named member (False:
        its parameters and optimizer state stay as they were; its BatchNorm statistics still
        move with its training-mode pass), computed inside the jitted step from the
        objective's terms (means over the global batch); a member not named updates. None
        (the default): every member updates every step (SwitOKD pauses its teacher)."""
        return None

    def learning_rate_scales(self) -> dict[str, float]:
        """A factor on the learning rate per named member (1 for the others; SwitOKD's
        student: 0.1). Empty (the default): one learning rate for every member."""
        return {}

    def train_accuracy_logits(self, outputs: Outputs) -> dict[str, jax.Array]:
        """The models whose training accuracy a run logs (`train_acc_<name>`)."""
        return {self.deployed: outputs[f"{self.deployed}_logits"]}

    def evaluated(self, outputs: Outputs, state_outputs: Outputs | None = None) -> dict:
        """The models a run evaluates, by name, from `forward`'s outputs in inference mode (and
        those of the method's own state's weights, see `state_models`)."""
        raise NotImplementedError

    def evaluated_names(self) -> list[str]:
        """The names `evaluated` returns, in the order a run reports them."""
        raise NotImplementedError

    # ----------------------------------------------------------------- state of its own

    def init_state(self, params, batch_stats) -> dict[str, Any] | None:
        """State the method keeps besides the parameters (checkpointed with them), or None."""
        return None

    def state_outputs(
        self, state: Mapping[str, Any], images: jax.Array, model_of: ModelOf, *, train: bool
    ) -> tuple[Outputs, Any]:
        """`(outputs, aux)` the method's state adds to a train step's outputs (targets only),
        and what `update_state` needs of that forward pass."""
        return {}, None

    def update_state(self, state, params, step: jax.Array, aux) -> dict[str, Any]:
        """The state after a train step that moved the parameters to `params`."""
        return state

    def eval_state_outputs(self, state, images: jax.Array, model_of: ModelOf) -> Outputs | None:
        """`forward`'s outputs of the state's weights in inference mode, for `evaluated`."""
        return None

    def deployed_weights(self, saved: Mapping[str, Any], kind: str) -> Mapping[str, Any]:
        """`kind` ("params" or "batch_stats") of the weights the method deploys, from a saved
        state (the trained weights unless the method deploys others, such as a temporal mean)."""
        return saved[kind]

    def initial_state(self, state, config) -> tuple[Any, str | None]:
        """The train state a fresh run starts from (kd loads its frozen teacher) and a note."""
        return state, None
