"""Weight conversion between Flax and the PyTorch reference (`ffcl_jax/torch_reference`).

Users train in JAX and deploy in PyTorch: `to_torch_state_dict` turns a network's (or the fusion
module's) Flax parameters and BatchNorm statistics into the `state_dict` of the reference model
of the same name; `from_torch_state_dict` goes back. Modules have the same names on both sides,
so the mapping is by name and layout only:

| Flax (NHWC)                     | PyTorch (NCHW)                                  |
|---------------------------------|-------------------------------------------------|
| conv `kernel` (kh, kw, in/g, out) | `weight` (out, in/g, kh, kw)                  |
| dense `kernel` (in, out)        | `weight` (out, in)                              |
| `bias`                          | `bias`                                          |
| BatchNorm `scale`, `bias`       | `weight`, `bias`                                |
| BatchNorm `mean`, `var`         | `running_mean`, `running_var` (+ `num_batches_tracked`) |

Arrays are numpy on the JAX side; the PyTorch side gets `torch.Tensor`s when torch is
importable, numpy arrays otherwise (pass `as_numpy=True` to force them).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ffcl_jax.errors import UserError
from ffcl_jax.export import fill_like, flatten

_BN_TO_TORCH = {"scale": "weight", "mean": "running_mean", "var": "running_var"}


def _torch_key(flax_name: str, is_batch_norm: bool) -> str:
    module, _, leaf = flax_name.rpartition("/")
    if leaf == "kernel":
        leaf = "weight"
    elif is_batch_norm:
        leaf = _BN_TO_TORCH.get(leaf, leaf)
    return f"{module.replace('/', '.')}.{leaf}" if module else leaf


def _is_kernel(name: str) -> bool:
    """A path's leaf is a kernel (a module's `kernel`, or a bare layer's, e.g. PCL's
    peer-ensemble classifier, whose path is just `kernel`)."""
    return name.split("/")[-1] == "kernel"


def _kernel_to_torch(value: np.ndarray) -> np.ndarray:
    return np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T


def _kernel_from_torch(value: np.ndarray) -> np.ndarray:
    return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value.T


def _names(params, batch_stats) -> tuple[dict, dict, set[str]]:
    flat_params, flat_stats = flatten(params), flatten(batch_stats)
    return flat_params, flat_stats, {name.rpartition("/")[0] for name in flat_stats}


def to_torch_state_dict(params, batch_stats, *, as_numpy: bool = False) -> dict[str, Any]:
    """Flax `params` / `batch_stats` of one network (or the fusion module) -> `state_dict`."""
    flat_params, flat_stats, bn_modules = _names(params, batch_stats)
    out: dict[str, Any] = {}
    for name, value in {**flat_params, **flat_stats}.items():
        is_bn = name.rpartition("/")[0] in bn_modules
        array = _kernel_to_torch(value) if _is_kernel(name) else value
        out[_torch_key(name, is_bn)] = np.ascontiguousarray(array)
    for module in sorted(bn_modules):
        out[f"{module.replace('/', '.')}.num_batches_tracked"] = np.zeros((), np.int64)
    if as_numpy:
        return out
    try:
        import torch
    except ImportError:
        return out
    return {k: torch.from_numpy(v.copy()) for k, v in out.items()}


def from_torch_state_dict(state_dict, like_params, like_batch_stats):
    """A reference model's `state_dict` -> Flax trees shaped like `like_params` and
    `like_batch_stats` (what `nnx.split(model, nnx.Param, nnx.BatchStat)` gives). A missing or
    extra entry, or a shape that does not fit, is an error naming it."""
    arrays = {
        k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
        for k, v in state_dict.items()
        if not k.endswith("num_batches_tracked")
    }
    flat_params, flat_stats, bn_modules = _names(like_params, like_batch_stats)
    converted: list[dict[str, np.ndarray]] = [{}, {}]
    used = set()
    for target, names in zip(converted, (flat_params, flat_stats), strict=True):
        for name in names:
            key = _torch_key(name, name.rpartition("/")[0] in bn_modules)
            if key not in arrays:
                raise UserError(f"the state_dict has no {key!r} (for Flax {name})")
            value = arrays[key]
            target[name] = _kernel_from_torch(value) if _is_kernel(name) else value
            used.add(key)
    extra = sorted(set(arrays) - used)
    if extra:
        raise UserError(f"the state_dict has entries this model lacks, first {extra[0]!r}")
    return (
        fill_like(like_params, converted[0], "the PyTorch state_dict"),
        fill_like(like_batch_stats, converted[1], "the PyTorch state_dict"),
    )


def torch_model_from_export(path: str, role: str = "student"):
    """The exported network (`python -m ffcl_jax.export`) as the PyTorch reference model of the
    same name, weights loaded, in eval mode; needs `pip install ffcl_jax[torch]`.

    Its input is what the JAX model takes, NCHW instead of NHWC: images normalised with the
    export's `meta["normalization"]` (mean and std times its scale).

        model = convert.torch_model_from_export("student.npz")
        logits, stage_maps = model(normalized_nchw_images)
    """
    from ffcl_jax.export import read_export
    from ffcl_jax.torch_reference.models import create_model

    exported = read_export(path)
    meta = exported.meta
    flat_params, flat_stats = exported.network(role)
    model = create_model(meta["roles"][role], meta["num_classes"], meta["image_shape"][-1])
    bn_modules = {name.rpartition("/")[0] for name in flat_stats}
    state_dict = {}
    for name, value in {**flat_params, **flat_stats}.items():
        array = _kernel_to_torch(value) if _is_kernel(name) else value
        state_dict[_torch_key(name, name.rpartition("/")[0] in bn_modules)] = array
    import torch

    missing = {k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}
    model.load_state_dict({**missing, **tensors}, strict=True)
    return model.eval()
