"""Fingerprints of every preset: what a refactoring must leave exactly as it is.

For each case (a preset, or FFCL with another feature form), on a fixed seed and tiny synthetic
batches in float64: every metric of three train steps (the loss, each named term, the ramp-up
weight, the training accuracies, the learning rate), the models a run evaluates with checksums
of their logits, the export's keys and parameter count, and the checkpoint's tree of key paths.
`scripts/fingerprint.py --record` writes them to `tests/data/fingerprints.json`;
`tests/test_fingerprints.py` recomputes and compares them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Each case: config overrides on top of `fingerprint_config`.
CASES: dict[str, dict] = {
    "independent": {"method": "independent"},
    "kd": {"method": "kd", "teacher_checkpoint": "not-read-by-build"},
    "dml": {"method": "dml"},
    "ffl": {"method": "ffl"},
    "ffcl": {"method": "ffcl"},
    "ffcl_mutual_attention": {"method": "ffcl", "loss.feat_direction": "mutual"},
    "ffcl_fused_map": {"method": "ffcl", "loss.feat_form": "fused_map"},
    "ffcl_stage_fusion": {"method": "ffcl", "loss.feat_form": "stage_fusion"},
    "ffcl_label_smoothing": {"method": "ffcl", "loss.regularizer": "label_smoothing"},
    "kdcl": {"method": "kdcl"},
    "kdcl_min_logit": {"method": "kdcl", "loss.collaborative_target": "min_logit"},
    "one": {"method": "one"},
    "cl_ilr": {"method": "cl_ilr"},
    "okddip": {"method": "okddip"},
    "pcl": {"method": "pcl"},
    "mcl": {"method": "mcl"},
    # Sharp switch distributions, so that the teacher is paused within the three steps.
    "switokd": {"method": "switokd", "loss.switch_tau": 0.2},
    "ffsd": {"method": "ffsd"},
}
STEPS = 3
STEPS_PER_EPOCH = 2  # the ramp-up and the learning-rate decay both move within the three steps
BATCH = 16


def fingerprint_config(**overrides):
    """A heterogeneous pair (ResNet-14 teacher, ResNet-8 student) on Fashion-MNIST's shapes, in
    float64 on XLA's kernels, with a one-epoch ramp-up and a decay after the first epoch."""
    from configs.fashion_mnist import get_config
    from tests.conftest import apply_overrides

    config = get_config()
    config.teacher = "resnet14"
    config.student = "resnet8"
    config.compute_dtype = "float64"
    config.cpu.kernels = "xla"
    config.batch_size = BATCH
    config.lr_decay_epochs = (1,)
    config.loss.rampup_epochs = 1.0
    config.seed = 7
    return apply_overrides(config, overrides)


def _checksum(z) -> list[float]:
    z = np.asarray(z, np.float64)
    return [float(z.sum()), float(np.sqrt((z * z).sum())), *map(float, z.reshape(-1)[:4])]


def _key_paths(tree) -> list[str]:
    """Every leaf as `a/b/c shape dtype`, keys joined the same whether they are attributes,
    dict keys or indices (so a state saved as a dict compares with one saved as a dataclass)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return sorted(
        f"{_joined(path)} {tuple(np.shape(leaf))} {np.asarray(leaf).dtype}" for path, leaf in leaves
    )


def _joined(path) -> str:
    keys = (getattr(e, "key", getattr(e, "idx", getattr(e, "name", e))) for e in path)
    return "/".join(str(key) for key in keys)


def compute(name: str) -> dict:
    """The fingerprint of case `name` with the code as it is now."""
    from flax import nnx

    from ffcl_jax import checkpoint, export, input_pipeline, train

    with jax.enable_x64(True):
        config = fingerprint_config(**CASES[name])
        method = train.check_config(config, 1)
        setup, state = train.build(config, method, STEPS_PER_EPOCH)
        rng = np.random.default_rng(0)
        views = () if method.num_views == 1 else (method.num_views,)
        images = rng.integers(0, 256, (STEPS * BATCH, *views, 28, 28, 1)).astype(np.uint8)
        labels = rng.integers(0, 10, STEPS * BATCH).astype(np.int32)
        step = jax.jit(setup.train_step)
        metrics_by_step = []
        for i in range(STEPS):
            part = slice(BATCH * i, BATCH * (i + 1))
            state, metrics = step(state, {"image": images[part], "label": labels[part]})
            metrics_by_step.append({k: float(v) for k, v in jax.device_get(metrics).items()})

        eval_images = input_pipeline.normalize(
            jnp.asarray(rng.integers(0, 256, (BATCH, 28, 28, 1)).astype(np.uint8)), setup.info
        )

        def model_of(params, batch_stats):
            return nnx.merge(setup.graphdef, params, batch_stats)

        cohort = model_of(state.params, state.batch_stats)
        outputs = method.forward(cohort, eval_images, train=False)
        state_outputs = method.eval_state_outputs(state.method_state, eval_images, model_of)
        evaluated = {k: _checksum(z) for k, z in method.evaluated(outputs, state_outputs).items()}

        saved = checkpoint.saved_tree(state)
        deployed = method.deployed
        export_arrays = {}
        for kind in ("params", "batch_stats"):
            weights = method.deployed_weights(saved, kind)[deployed]
            for key, value in export.flatten(weights).items():
                export_arrays[f"{deployed}/{kind}/{key}"] = value
        export_params = sum(
            v.size for k, v in export_arrays.items() if k.startswith(f"{deployed}/params/")
        )
        return {
            "terms": {k: [m[k] for m in metrics_by_step] for k in sorted(metrics_by_step[0])},
            "evaluated": dict(sorted(evaluated.items())),
            "export_keys": sorted(export_arrays),
            "export_parameters": int(export_params),
            "checkpoint_tree": _key_paths(saved),
        }


def compare(recorded: dict, current: dict, rtol: float = 1e-12) -> list[str]:
    """The differences between two fingerprints of one case, one line each (empty: the same)."""
    problems = []
    if sorted(recorded["terms"]) != sorted(current["terms"]):
        problems.append(f"terms {sorted(recorded['terms'])} -> {sorted(current['terms'])}")
    for key in sorted(set(recorded["terms"]) & set(current["terms"])):
        a, b = np.asarray(recorded["terms"][key]), np.asarray(current["terms"][key])
        if not np.allclose(a, b, rtol=rtol, atol=rtol):
            problems.append(f"term {key}: {a.tolist()} -> {b.tolist()}")
    if sorted(recorded["evaluated"]) != sorted(current["evaluated"]):
        problems.append(
            f"evaluated {sorted(recorded['evaluated'])} -> {sorted(current['evaluated'])}"
        )
    for key in sorted(set(recorded["evaluated"]) & set(current["evaluated"])):
        a, b = np.asarray(recorded["evaluated"][key]), np.asarray(current["evaluated"][key])
        if not np.allclose(a, b, rtol=rtol, atol=rtol):
            problems.append(f"logits of {key}: {a.tolist()} -> {b.tolist()}")
    for key in ("export_keys", "export_parameters", "checkpoint_tree"):
        if recorded[key] != current[key]:
            problems.append(f"{key} changed")
    return problems
