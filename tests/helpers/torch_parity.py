"""The PyTorch mirror of a JAX cohort with the same weights, and the check that both hold the
same parameters: shared by the parity tests of the train step and of the optimizers."""

from __future__ import annotations

import numpy as np

from ffcl_jax import convert, datasets
from ffcl_jax.torch_reference import methods as torch_methods


def member_stats(batch_stats, member):
    """A member's BatchNorm statistics; a member without BatchNorm (the fused map's adapters,
    OKDDip's attention, PCL's peer-ensemble classifier) has none."""
    return batch_stats[member] if member in batch_stats else {}


def reference_cohort(config, method, params, batch_stats):
    """The method's PyTorch mirror (`MIRRORS[name].build`) with the JAX cohort's weights and
    statistics loaded member by member, in float64. The mirror must have exactly the JAX
    cohort's members: one without weights on the JAX side fails here, as does a missing one."""
    info = datasets.dataset_info(config.dataset)
    reference = torch_methods.MIRRORS[config.method].build(config, method, info)
    members = {name.split(".")[0] for name in reference.state_dict()}
    assert members == set(params), f"reference members {members}, JAX members {set(params)}"
    for member in params:
        getattr(reference, member).load_state_dict(
            convert.to_torch_state_dict(params[member], member_stats(batch_stats, member)),
            strict=True,
        )
    return reference.double()


def assert_same_parameters(params, batch_stats, cohort, atol: float, what: str):
    """Every parameter and BatchNorm running mean, in the order of the reference's modules
    (stem first): a failure names the first that differs. (Running variances differ by design:
    Flax averages the biased batch variance, PyTorch the unbiased one.)"""
    for member in params:
        ours = convert.to_torch_state_dict(
            params[member], member_stats(batch_stats, member), as_numpy=True
        )
        for name, value in getattr(cohort, member).state_dict().items():
            if name.endswith(("running_var", "num_batches_tracked")):
                continue
            np.testing.assert_allclose(
                ours[name],
                value.detach().numpy(),
                atol=atol,
                rtol=0,
                err_msg=f"{what}: {member}.{name} is the first that differs",
            )
