"""Export trained networks to a standalone file, and load networks safely for inference or KD.

    python -m ffcl_jax.export --workdir=DIR [--output=FILE.npz] [--teacher] [--step=N]

writes the network the run's method deploys (its student; `--members` names others, `--teacher`
adds the teacher) from a run's checkpoint, parameters and BatchNorm statistics, to one `.npz`
file with the run's config and the data set's normalisation; `load_exported(FILE)` rebuilds the
network for inference with no other file. Every member written is a plain zoo network.

Safety: an export is a numpy zip read with `allow_pickle=False`, its metadata is JSON, and
checkpoints are orbax (tensorstore/OCDBT) arrays plus JSON: loading either never runs code from
the file. Anything else (a pickle, a torch file, an object array) is refused with an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from ffcl_jax import storage
from ffcl_jax.errors import UserError

EXPORT_FORMAT = "ffcl_jax.export"
EXPORT_VERSION = 1
_META_KEY = "__meta__"


# --------------------------------------------------------------------------- pytrees <-> flat


def _path_name(path) -> str:
    parts = []
    for entry in path:
        key = getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry)))
        parts.append(str(key))
    if parts and parts[-1] == "value":  # the leaf of an nnx Variable
        parts.pop()
    return "/".join(parts)


def flatten(tree) -> dict[str, np.ndarray]:
    """`{"stages/0/blocks/1/conv1/kernel": array, ...}` for an nnx State or nested dicts."""
    return {
        _path_name(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def fill_like(like, flat: Mapping[str, np.ndarray], what: str):
    """`like` (an nnx State) with every leaf taken from `flat`; any missing, extra or
    differently shaped entry is an error naming it."""
    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = [_path_name(path) for path, _ in paths_and_leaves]
    missing = [n for n in names if n not in flat]
    extra = sorted(set(flat) - set(names))
    if missing or extra:
        detail = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise UserError(
            f"{what} does not fit the network this config builds ({detail}; "
            f"{len(missing)} missing, {len(extra)} unexpected entries): check the model name"
        )
    leaves = []
    for name, (_, leaf) in zip(names, paths_and_leaves, strict=True):
        value = flat[name]
        if value.shape != leaf.shape:
            raise UserError(
                f"{what}: {name} has shape {value.shape}, the network built from this config "
                f"needs {leaf.shape}: check the model name and number of classes"
            )
        leaves.append(np.asarray(value, dtype=leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


# --------------------------------------------------------------------------- files


@dataclasses.dataclass
class Exported:
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def network(self, member: str) -> tuple[dict, dict]:
        """Flat parameter and BatchNorm statistic arrays of `member` (the file's "roles")."""
        if member not in self.meta["roles"]:
            raise UserError(
                f"the export holds {', '.join(self.meta['roles'])}, not the {member}; export "
                f"it with --members={member}"
            )
        parts = {}
        for kind in ("params", "batch_stats"):
            prefix = f"{member}/{kind}/"
            parts[kind] = {
                k[len(prefix) :]: v for k, v in self.arrays.items() if k.startswith(prefix)
            }
        return parts["params"], parts["batch_stats"]


def read_export(path: str) -> Exported:
    """Reads an export written by `export_run`, never unpickling anything."""
    try:
        with storage.path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not an export")
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(
            f"{path} is not an ffcl_jax export ({reason}); only files written by "
            "`python -m ffcl_jax.export` are read (pickles and object arrays are refused)"
        ) from exc
    meta_bytes = arrays.pop(_META_KEY, None)
    try:
        meta = json.loads(bytes(meta_bytes).decode()) if meta_bytes is not None else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise UserError(f"{path} is not an ffcl_jax export (no {EXPORT_FORMAT} metadata)")
    if meta.get("format_version") != EXPORT_VERSION:
        raise UserError(
            f"{path} is export format {meta.get('format_version')!r}; this version reads "
            f"{EXPORT_VERSION}: re-export it with this version from the run's checkpoint"
        )
    return Exported(meta, arrays)


def run_method(config: Mapping):
    """The method of a run, from its saved config (a dict)."""
    from ffcl_jax import methods

    return methods.create(
        config["method"], config.get("loss"), config.get("protocol_rampup_epochs")
    )


def export_run(
    workdir: str, output: str | None = None, members=None, step: int | str | None = None
) -> str:
    """Writes `members` of the run in `workdir` (default: the member its method deploys) to
    `output`, from checkpoint `step`: a number, "latest" (default) or "best" (the kept checkpoint
    with the best `config.best_metric`)."""
    from ffcl_jax import checkpoint, datasets

    checkpoints, latest = checkpoint.open_finished_run(workdir)
    try:
        if step in (None, "latest"):
            step = latest
        elif step == "best":
            step = checkpoints.manager.best_step()
            if step is None:
                raise UserError(f"{checkpoints.directory} has no checkpoint with test metrics")
        else:
            step = int(step)
        if step not in checkpoints.manager.all_steps():
            raise UserError(
                f"no checkpoint step {step} in {checkpoints.directory}; steps there: "
                f"{sorted(checkpoints.manager.all_steps())}"
            )
        meta = checkpoints.read_meta(step)
        state = checkpoints.restore_raw_state(step)
    finally:
        checkpoints.close()
    config = meta["config"]
    method = run_method(config)
    networks = method.networks(ml_collections.ConfigDict(config))
    # None stands for the deployed network (the `--teacher` shorthand adds to it).
    members = tuple(dict.fromkeys(m or method.deployed for m in members or (None,)))
    unknown = [m for m in members if m not in networks]
    if unknown:
        raise UserError(
            f"the {config['method']} run has no network {unknown[0]!r} to export; its "
            f"networks: {', '.join(networks)}"
        )
    info = datasets.dataset_info(config["dataset"])
    arrays: dict[str, np.ndarray] = {}
    for member in members:
        for kind in ("params", "batch_stats"):
            for name, value in flatten(method.deployed_weights(state, kind)[member]).items():
                arrays[f"{member}/{kind}/{name}"] = value
    history = meta["progress"]["history"]
    export_meta = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "roles": {member: networks[member] for member in members},
        "num_classes": info.num_classes,
        "image_shape": list(info.image_shape),
        "dataset": config["dataset"],
        "normalization": {"mean": list(info.mean), "std": list(info.std), "scale": 255.0},
        "step": int(step),
        "epoch": meta["progress"]["epoch"],
        "test_top1": history[-1] if history else None,
        "config": config,
    }
    target = storage.path(output or storage.path(workdir) / f"export_step{step}.npz")
    arrays[_META_KEY] = np.frombuffer(json.dumps(export_meta).encode(), np.uint8)
    tmp = target.parent / (target.name + ".tmp.npz")
    with tmp.open("wb") as f:  # local or gs://; renamed when complete
        np.savez(f, **arrays)
    tmp.replace(target)
    return os.fspath(target)


# --------------------------------------------------------------------------- loading


def load_network(path: str, member: str, config, like) -> tuple[Any, Any, str]:
    """`member`'s parameters and BatchNorm statistics from a run's workdir (latest checkpoint)
    or an export, as flat dicts checked against the trees `like = (params, batch_stats)`; checks
    that the model (`config[member]`) and data set match `config`. Returns them and a
    description of the source."""
    from ffcl_jax import checkpoint

    model = config[member]
    if storage.path(path).is_file():
        exported = read_export(path)
        flat_params, flat_stats = exported.network(member)  # raises, naming what it holds
        saved_model, dataset = exported.meta["roles"][member], exported.meta["dataset"]
        source = f"export {path} (step {exported.meta['step']})"
    else:
        checkpoints, step = checkpoint.open_finished_run(path)
        try:
            meta = checkpoints.read_meta(step)
            state = checkpoints.restore_raw_state(step)
        finally:
            checkpoints.close()
        saved_model, dataset = meta["config"][member], meta["config"]["dataset"]
        method = run_method(meta["config"])
        flat_params = flatten(method.deployed_weights(state, "params")[member])
        flat_stats = flatten(method.deployed_weights(state, "batch_stats")[member])
        source = f"{checkpoints.directory} step {step} (epoch {meta['progress']['epoch']})"
    if saved_model != model or dataset != config.dataset:
        raise UserError(
            f"{path} holds a {member} {saved_model!r} trained on {dataset!r}, but this config "
            f"asks for {model!r} on {config.dataset!r}: set config.{member}={saved_model!r} or "
            "point to a matching run"
        )
    fill_like(like[0], flat_params, f"{member} in {path}")
    fill_like(like[1], flat_stats, f"{member} in {path}")
    return flat_params, flat_stats, source


def with_loaded_member(state, config, member: str):
    """`(state, source)`: the train state with `member` replaced by the one in
    `config.teacher_checkpoint` (a run's workdir or an exported .npz)."""
    params, batch_stats, source = load_network(
        config.teacher_checkpoint,
        member,
        config,
        like=(state.params[member], state.batch_stats[member]),
    )

    def replace_member(tree, member_arrays):
        flat = flatten(tree)
        flat.update({f"{member}/{name}": value for name, value in member_arrays.items()})
        return fill_like(tree, flat, f"the cohort with the loaded {member}")

    return (
        state.replace(
            params=replace_member(state.params, params),
            batch_stats=replace_member(state.batch_stats, batch_stats),
        ),
        source,
    )


def load_exported(path: str, member: str = "student"):
    """`(model, predict, meta)`: the exported network as an nnx module in inference mode, and
    `predict(images) -> logits` taking uint8 NHWC images as the data set stores them."""
    import jax.numpy as jnp
    from flax import nnx

    from ffcl_jax import models

    exported = read_export(path)
    meta = exported.meta
    flat_params, flat_stats = exported.network(member)
    model = models.create_model(
        meta["roles"][member],
        meta["num_classes"],
        in_channels=meta["image_shape"][-1],
        rngs=nnx.Rngs(0),
    )
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    nnx.update(
        model,
        fill_like(params, flat_params, f"{member} in {path}"),
        fill_like(batch_stats, flat_stats, f"{member} in {path}"),
    )
    norm = meta["normalization"]
    mean = jnp.asarray(norm["mean"], jnp.float32) * norm["scale"]
    std = jnp.asarray(norm["std"], jnp.float32) * norm["scale"]

    @jax.jit
    def _logits(graph_state, images):
        net = nnx.merge(graphdef, graph_state)
        return net((images.astype(jnp.float32) - mean) / std, train=False)[0]

    graphdef, graph_state = nnx.split(model)

    def predict(images) -> jax.Array:
        return _logits(graph_state, jnp.asarray(images))

    return model, predict, meta


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m ffcl_jax.export",
        description="Write a run's trained networks to a standalone .npz file.",
    )
    parser.add_argument("--workdir", required=True, help="the run's workdir")
    parser.add_argument("--output", help="file to write (default WORKDIR/export_stepN.npz)")
    parser.add_argument(
        "--members", default="", help="comma-separated networks (default: the one deployed)"
    )
    parser.add_argument("--teacher", action="store_true", help="add the teacher network")
    parser.add_argument(
        "--step", default="latest", help="checkpoint step: a number, latest (default) or best"
    )
    args = parser.parse_args(argv)
    members = [m for m in args.members.split(",") if m]
    if args.teacher:
        members = [*(members or [None]), "teacher"]
    if args.step not in ("latest", "best") and not args.step.isdigit():
        parser.error(f"--step must be a number, latest or best, not {args.step!r}")
    try:
        output = export_run(args.workdir, args.output, members or None, args.step)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written = read_export(output).meta["roles"]
    print(f"wrote {', '.join(written)} to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
