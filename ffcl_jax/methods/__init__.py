"""The methods, by name: one module each (a family of presets may share one).

`create(name, overrides)` resolves a method's settings (its defaults, then every non-None entry
of `overrides`, usually `config.loss`) and validates them. A new method is a module with a
`Method` subclass and a line here; docs/adding_a_method.md walks through one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ffcl_jax.errors import UserError
from ffcl_jax.methods.base import Cohort, Method
from ffcl_jax.methods.branches import BranchMethod
from ffcl_jax.methods.ffsd import FFSD
from ffcl_jax.methods.kd import KD
from ffcl_jax.methods.kdcl import KDCL
from ffcl_jax.methods.mcl import MCL
from ffcl_jax.methods.pair import PairMethod
from ffcl_jax.methods.pcl import PCL
from ffcl_jax.methods.switokd import SwitOKD

REGISTRY: dict[str, type[Method]] = {
    "independent": PairMethod,
    "kd": KD,
    "dml": PairMethod,
    "ffl": PairMethod,
    "ffcl": PairMethod,
    "kdcl": KDCL,
    "one": BranchMethod,
    "cl_ilr": BranchMethod,
    "okddip": BranchMethod,
    "pcl": PCL,
    "mcl": MCL,
    "switokd": SwitOKD,
    "ffsd": FFSD,
}

__all__ = ["REGISTRY", "Cohort", "Method", "create", "setting_types"]
_TYPES = {"float": float, "int": int, "bool": bool, "str": str}


def create(
    name: str,
    overrides: Mapping[str, Any] | None = None,
    protocol_rampup_epochs: float | None = None,
) -> Method:
    """The method `name`, its settings resolved (`Method.create`)."""
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; valid methods: {', '.join(REGISTRY)}")
    return REGISTRY[name].create(name, overrides, protocol_rampup_epochs)


def setting_types() -> dict[str, type]:
    """Every registered method's setting names with their types (the config's `loss` group)."""
    types: dict[str, type] = {}
    for method in REGISTRY.values():
        for field in dataclasses.fields(method.Settings):
            annotation = str(field.type)
            types.setdefault(
                field.name, tuple if annotation.startswith("tuple") else _TYPES[annotation]
            )
    return types
