"""Run checkpoints: orbax `CheckpointManager` in WORKDIR/checkpoints, resume checks, workdirs.

A checkpoint step holds two items:
- `state`: the whole `TrainState` (teacher, student and fusion parameters, BatchNorm statistics,
  the optimizer state of every role, the step), saved with `StandardSave` (tensorstore/OCDBT
  arrays, no pickle anywhere);
- `meta`: JSON with the format version, the run's config, the epoch and the batch within it
  (everything the input pipeline needs to continue: its order and augmentation derive from
  `(seed, epoch, position)`), the evaluation history, the best metric so far and timing totals.

Orbax writes a step into a temporary directory and renames it when complete, so a process killed
while saving leaves the previous steps restorable. The last `keep_checkpoints` steps and the best
one (by `config.best_metric`) are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from ffcl_jax.errors import UserError

FORMAT_VERSION = 1
CHECKPOINT_SUBDIR = "checkpoints"
PREVIOUS_RUNS_SUBDIR = "previous_runs"
# What a run writes into its workdir; `--fresh` moves these aside together.
RUN_OUTPUTS = (
    CHECKPOINT_SUBDIR,
    "metrics.jsonl",
    "results.json",
    "config.json",
    "curves.png",
    "tensorboard",
)
# Config keys a resumed run may change: they do not alter what was computed so far.
RESUMABLE_KEYS = frozenset(
    {
        "num_epochs",
        "xla_cpu_ynn_fusion",  # a compiler setting: the same computation, other fusion decisions
        "batch_norm_backward",  # the same gradient, other rounding
        "xla_cpu_flatten_after_fusion",  # a compiler setting, like xla_cpu_ynn_fusion
        "log_every_steps",
        "eval_every_epochs",
        "checkpoint_every_epochs",
        "keep_checkpoints",
        "data_dir",
        "idx_dir",
        "download",
        "eval_batch_size",
        "mesh.data",  # with global BatchNorm the device count does not change the maths
    }
)


def flat_config(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """`{"loss.tau": 3.0, ...}`, with JSON types, so configs compare like for like."""
    tree = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json") else config
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat[prefix[:-1]] = node

    walk("", tree)
    return flat


# Config keys added after checkpoints were first written, with the value that reproduces what
# runs did before the key existed: a checkpoint without the key resumes under that value.
ADDED_KEYS = {
    "data_on_device": False,
    "xla_cpu_ynn_fusion": "auto",
    "batch_norm_backward": "autodiff",
    "xla_cpu_flatten_after_fusion": False,
    "validation_size": 0,
    "validation_seed": 0,
}


def config_differences(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
    """Human-readable differences between a checkpoint's config and `config`, resumable keys
    excepted."""
    before, now = {**ADDED_KEYS, **flat_config(saved)}, flat_config(config)
    resumable = set(RESUMABLE_KEYS)
    if now.get("batch_norm") == "per_device":
        resumable.discard("mesh.data")  # the device count is then part of the normalisation
    return [
        f"{key}={before.get(key)!r} in the checkpoint but {now.get(key)!r} now"
        for key in sorted(set(before) | set(now))
        if key not in resumable and before.get(key) != now.get(key)
    ]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = (text.splitlines()[0] if text else "") or type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _mismatch(exc: BaseException) -> str | None:
    """For orbax's "tree structures do not match" / shape errors, where they differ first;
    None for anything else (truncated, garbled or missing files)."""
    text = str(exc)
    if "do not match" in text:
        lines = text.strip().splitlines()
        where = lines[1].strip().rstrip(":") if len(lines) > 1 else "the tree"
        return f"its arrays differ from this model's at {where}"
    if "shape" in text.lower() and "DATA_LOSS" not in text:
        return _first_line(exc)
    return None


# --------------------------------------------------------------------------- workdirs


def existing_outputs(workdir: str) -> list[str]:
    return [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(workdir, name))]


def move_previous_run(workdir: str) -> str | None:
    """`--fresh`: moves an earlier run's outputs to WORKDIR/previous_runs/<UTC time>/ (never
    deletes them); returns where they went, or None if there was nothing to move."""
    names = existing_outputs(workdir)
    if not names:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = os.path.join(workdir, PREVIOUS_RUNS_SUBDIR, stamp)
    suffix = 0
    while os.path.exists(target):
        suffix += 1
        target = os.path.join(workdir, PREVIOUS_RUNS_SUBDIR, f"{stamp}-{suffix}")
    os.makedirs(target)
    for name in names:
        shutil.move(os.path.join(workdir, name), os.path.join(target, name))
    return target


def truncate_metrics_log(path: str, last_step: int) -> None:
    """Drops the rows a resumed run will write again (logged after its checkpoint's step)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(rows):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


# --------------------------------------------------------------------------- manager


class RunCheckpoints:
    """The run's `CheckpointManager`, with resume checks that fail with a clear `UserError`."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, *, read_only=False):
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_SUBDIR))
        policies: list = [checkpoint_managers.LatestN(n=max(int(config.keep_checkpoints), 1))]
        if config.best_metric:
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[config.best_metric],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            # A reader never saves, so nothing is deleted; orbax's own read_only mode only adds
            # log noise.
            create=not read_only,
            # Saves run in a background thread; the loop only waits for the device-to-host copy.
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(dict(meta, format_version=FORMAT_VERSION)),
            ),
            metrics=metrics,
            force=True,  # the loop decides when to save
        )

    def read_meta(self, step: int) -> dict:
        where = f"checkpoint step {step} in {self.directory}"
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = meta["meta"]
        except Exception as exc:  # orbax/tensorstore report damage in many exception types
            raise UserError(
                f"{where} is unreadable ({_first_line(exc)}); move that step's folder out of "
                f"{self.directory} to resume from an earlier one, or pass --fresh "
                "(the old run is moved aside, not deleted)"
            ) from exc
        version = meta.get("format_version") if isinstance(meta, dict) else None
        if version != FORMAT_VERSION:
            raise UserError(
                f"{where} has checkpoint format {version!r}, this version of ffcl_jax reads "
                f"format {FORMAT_VERSION}; resume it with the ffcl_jax that wrote it, or pass "
                "--fresh (the old run is moved aside, not deleted)"
            )
        return meta

    def check_config(self, step: int, meta: dict, config: ml_collections.ConfigDict) -> None:
        differences = config_differences(meta["config"], config)
        if differences:
            raise UserError(
                f"checkpoint step {step} in {self.directory} was written with another config: "
                + "; ".join(differences)
                + ". Resume with the checkpoint's values, use a new --workdir, or pass --fresh "
                "(the old run is moved aside, not deleted)"
            )

    def restore_state(self, step: int, like):
        """The saved `TrainState`, laid out (shapes, dtypes, shardings) like `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
            )
        except Exception as exc:
            mismatch = _mismatch(exc)
            if mismatch:
                raise UserError(
                    f"checkpoint step {step} in {self.directory} cannot be restored into the "
                    f"model this config builds ({mismatch}): it holds another model; use a new "
                    "--workdir or pass --fresh (nothing was deleted)"
                ) from exc
            raise UserError(
                f"checkpoint step {step} in {self.directory} is damaged (its array files are "
                f"truncated or garbled: {_first_line(exc)}); move that step's folder out of "
                f"{self.directory} to resume from an earlier one, or pass --fresh "
                "(nothing was deleted)"
            ) from exc
        return restored["state"]

    def restore_raw_state(self, step: int) -> dict:
        """The saved state as nested dicts of arrays, without a target (for reading parts)."""
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
            )
        except Exception as exc:
            raise UserError(
                f"checkpoint step {step} in {self.directory} is unreadable ({_first_line(exc)})"
            ) from exc
        return restored["state"]

    def __enter__(self) -> RunCheckpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def open_finished_run(path: str, config: ml_collections.ConfigDict) -> tuple[RunCheckpoints, int]:
    """A run's checkpoints, read-only, from its workdir (or its checkpoints folder)."""
    workdir = path
    if os.path.basename(os.path.normpath(path)) == CHECKPOINT_SUBDIR:
        workdir = os.path.dirname(os.path.normpath(path))
    if not os.path.isdir(os.path.join(workdir, CHECKPOINT_SUBDIR)):
        raise UserError(
            f"{path!r} holds no checkpoints/ folder: give the workdir of a finished run "
            "(or an exported .npz file)"
        )
    checkpoints = RunCheckpoints(workdir, config, read_only=True)
    step = checkpoints.latest_step()
    if step is None:
        raise UserError(f"{checkpoints.directory} holds no finished checkpoint")
    return checkpoints, step
