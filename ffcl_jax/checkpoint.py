"""Run checkpoints: orbax `CheckpointManager` in WORKDIR/checkpoints, resume checks, workdirs.

A checkpoint step holds two items:
- `state`: the whole `TrainState` (every member's parameters and BatchNorm statistics, the
  optimizer state, the step, and the method's own state beside them, such as PCL's
  `mean_params`), saved with `StandardSave` (tensorstore/OCDBT arrays, no pickle anywhere);
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
import time
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from ffcl_jax import storage
from ffcl_jax.errors import UserError
from ffcl_jax.storage import first_line

FORMAT_VERSION = 1
CHECKPOINT_SUBDIR = "checkpoints"
PREVIOUS_RUNS_SUBDIR = "previous_runs"
MOVED_NOTE = "moved.txt"  # in previous_runs/<time>/: what was moved, from where, when
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
        "cpu.ynn_fusion",  # a compiler setting: the same computation, other fusion decisions
        "cpu.flatten_after_fusion",  # a compiler setting, like cpu.ynn_fusion
        "cpu.kernels",  # the same convolutions and BatchNorm, other kernels: other rounding
        "cpu.malloc",  # where memory comes from
        "batch_norm_backward",  # the same gradient, other rounding
        "scan_blocks",  # the same blocks as one loop, the same weights: other rounding
        "remat",  # the same forward recomputed in the backward pass: other rounding
        "log_every_steps",
        "eval_every_epochs",
        "final_test",
        "reference_from_jax",  # read by the PyTorch reference only
        "checkpoint_every_epochs",
        "keep_checkpoints",
        "data_dir",
        "idx_dir",
        "tensorboard_dir",
        "compilation_cache_dir",
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
    "cpu.ynn_fusion": "auto",
    "batch_norm_backward": "autodiff",
    "cpu.flatten_after_fusion": False,
    "cpu.kernels": "xla",
    "cpu.malloc": "hugepages",
    "validation_size": 0,
    "validation_seed": 0,
    "warmup_epochs": 0.0,
    "final_test": True,  # runs with a validation split evaluated the test split before
    "reference_from_jax": False,
    "scan_blocks": False,
    "remat": "auto",  # what scan_blocks did before the key: its loop's body kept the dots
    # Runs before it set loss.rampup_epochs for every method instead.
    "protocol_rampup_epochs": None,
    # The branch methods', KDCL's and PCL's loss settings (None: the preset's value, as for
    # every loss key).
    **{
        f"loss.{key}": None
        for key in (
            "num_branches",
            "branch_stages",
            "gate",
            "backprop_rescale",
            "lam_ensemble_ce",
            "lam_branch_kd",
            "branch_target",
            "separate_views",
            "collaborative_target",
            "peer_ensemble",
            "temporal_mean_decay",
            "lam_temporal_kd",
        )
    },
}


# Config keys that moved, by their name in checkpoints written before the move.
RENAMED_KEYS = {
    "xla_cpu_ynn_fusion": "cpu.ynn_fusion",
    "xla_cpu_flatten_after_fusion": "cpu.flatten_after_fusion",
    "cpu_kernels": "cpu.kernels",
    # Under cpu until the TPU took the closed form too; before that, top-level as today.
    "cpu.batch_norm_backward": "batch_norm_backward",
    # A switch for huge pages until malloc had more than one choice (resumable either way).
    "cpu.hugepage_malloc": "cpu.malloc",
}


def current_key_names(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat config written by an earlier version, under today's key names."""
    return {RENAMED_KEYS.get(key, key): value for key, value in flat.items()}


def with_method_settings(flat: dict[str, Any]) -> dict[str, Any] | None:
    """A flat config with its `loss.*` entries as its method resolves them (None entries as the
    method's defaults, the protocol's ramp-up applied); None where the method refuses them."""
    from ffcl_jax import methods

    loss = {key[len("loss.") :]: value for key, value in flat.items() if key.startswith("loss.")}
    try:
        method = methods.create(flat.get("method"), loss, flat.get("protocol_rampup_epochs"))
    except UserError:
        return None
    resolved = json.loads(json.dumps(method.settings_dict()))
    return {**flat, **{f"loss.{key}": value for key, value in resolved.items()}}


def config_as_run(config: ml_collections.ConfigDict, method) -> str:
    """`config` as the JSON a run's `config.json` holds: its method's settings written out as
    they resolved, so the file shows what the run trains."""
    tree = json.loads(config.to_json_best_effort())
    tree["loss"].update(json.loads(json.dumps(method.settings_dict())))
    return json.dumps(tree, indent=2)


def config_differences(
    saved: dict, config: ml_collections.ConfigDict, where: str = "in the checkpoint"
) -> list[str]:
    """Human-readable differences between a checkpoint's config and `config`, resumable keys
    excepted. The method's settings compare as they resolve: a default written out (as
    `config.json` does) equals the same default left as None."""
    before = {**ADDED_KEYS, **current_key_names(flat_config(saved))}
    now = flat_config(config)
    resumable = set(RESUMABLE_KEYS)
    if now.get("batch_norm") != "global":  # per_device or groups:N
        resumable.discard("mesh.data")  # the device count is then part of the normalisation
    before_resolved, now_resolved = with_method_settings(before), with_method_settings(now)
    if before_resolved is not None and now_resolved is not None:
        before, now = before_resolved, now_resolved
        resumable.add("protocol_rampup_epochs")  # what it changes shows in loss.rampup_epochs
    elif before.get("loss.rampup_epochs") is not None and now.get("loss.rampup_epochs") is not None:
        resumable.add("protocol_rampup_epochs")  # an explicit loss.rampup_epochs overrides it
    return [
        f"{key}={before.get(key)!r} {where} but {now.get(key)!r} now"
        for key in sorted(set(before) | set(now))
        if key not in resumable and before.get(key) != now.get(key)
    ]


def _mismatch(exc: BaseException) -> str | None:
    """For orbax's "tree structures do not match" / shape errors, where they differ first;
    None for anything else (truncated, garbled or missing files)."""
    text = str(exc)
    if "do not match" in text:
        lines = text.strip().splitlines()
        where = lines[1].strip().rstrip(":") if len(lines) > 1 else "the tree"
        return f"its arrays differ from this model's at {where}"
    if "shape" in text.lower() and "DATA_LOSS" not in text:
        return first_line(exc)
    return None


# --------------------------------------------------------------------------- workdirs


def existing_outputs(workdir) -> list[str]:
    workdir = storage.path(workdir)
    return [name for name in RUN_OUTPUTS if (workdir / name).exists()]


def saved_config(workdir) -> dict | None:
    """The config a run in `workdir` recorded when it started (`config.json`), if any."""
    path = storage.path(workdir) / "config.json"
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:
        return None


def move_previous_run(workdir) -> str | None:
    """Moves an earlier run's outputs to WORKDIR/previous_runs/<UTC time>/ (never deletes
    them); returns where they went, or None if there was nothing to move."""
    workdir = storage.path(workdir)
    names = existing_outputs(workdir)
    if not names:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = workdir / PREVIOUS_RUNS_SUBDIR / stamp
    suffix = 0
    while target.exists():
        suffix += 1
        target = workdir / PREVIOUS_RUNS_SUBDIR / f"{stamp}-{suffix}"
    if not storage.is_remote(target):
        target.mkdir(parents=True)
    # Also what makes the folder exist on Cloud Storage (no empty folders there) before the
    # renames into it.
    (target / MOVED_NOTE).write_text(
        f"moved here from {workdir} at {stamp} UTC: {', '.join(names)}\n"
    )
    for name in names:
        (workdir / name).rename(target / name)
    return os.fspath(target)


def truncate_metrics_log(path, last_step: int) -> None:
    """Drops the rows a resumed run will write again (logged after its checkpoint's step)."""
    path = storage.path(path)
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines(keepends=True) if line.strip()]
    kept = [line for line in rows if json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(rows):
        storage.write_text(path, "".join(kept))


# --------------------------------------------------------------------------- layout

# The train state's fields saved under their own names; the method's state (`method_state`, a
# dict) is saved beside them, one top-level entry per key, so the layout on disk is the same
# for every method and for checkpoints written before methods kept state of their own.
STATE_FIELDS = ("step", "params", "batch_stats", "opt_state")
# Checkpoints written before the method registry hold these (empty where the method kept no
# temporal mean): a restore accepts them empty.
EARLIER_EMPTY_ENTRIES = ("mean_params", "mean_batch_stats")


def saved_tree(state) -> dict[str, Any]:
    """The `TrainState` as the dict a checkpoint holds."""
    tree = {name: getattr(state, name) for name in STATE_FIELDS}
    return {**tree, **(state.method_state or {})}


def state_from_saved(saved: dict[str, Any], like):
    """The `TrainState` of a restored `saved_tree`, with `like`'s structure."""
    method_state = None
    if like.method_state is not None:
        method_state = {key: saved[key] for key in like.method_state}
    return like.replace(**{name: saved[name] for name in STATE_FIELDS}, method_state=method_state)


# --------------------------------------------------------------------------- manager


class RunCheckpoints:
    """The run's `CheckpointManager`, with resume checks that fail with a clear `UserError`."""

    def __init__(self, workdir: str, config: ml_collections.ConfigDict, *, read_only=False):
        directory = storage.path(workdir) / CHECKPOINT_SUBDIR
        self.directory = os.fspath(directory)
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
            directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict, metrics: dict | None = None) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(saved_tree(state)),
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
                f"{where} is unreadable ({first_line(exc)}); move that step's folder out of "
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
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, saved_tree(like))
        earlier = {**abstract, **{k: None for k in EARLIER_EMPTY_ENTRIES if k not in abstract}}
        try:
            try:
                restored = self._restore_state(step, abstract)
            except Exception as exc:
                if set(earlier) == set(abstract) or not _mismatch(exc):
                    raise
                restored = self._restore_state(step, earlier)  # an earlier version's layout
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
                f"truncated or garbled: {first_line(exc)}); move that step's folder out of "
                f"{self.directory} to resume from an earlier one, or pass --fresh "
                "(nothing was deleted)"
            ) from exc
        return state_from_saved(restored["state"], like)

    def _restore_state(self, step: int, abstract):
        return self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )

    def restore_raw_state(self, step: int) -> dict:
        """The saved state as nested dicts of arrays, without a target (for reading parts)."""
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
            )
        except Exception as exc:
            raise UserError(
                f"checkpoint step {step} in {self.directory} is unreadable ({first_line(exc)})"
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


def open_finished_run(
    path: str, config: ml_collections.ConfigDict | None = None
) -> tuple[RunCheckpoints, int]:
    """A run's checkpoints, read-only, from its workdir (or its checkpoints folder); `config`
    says which checkpoint is the best one, by default the run's own (its `config.json`)."""
    workdir = storage.path(path)
    if workdir.name == CHECKPOINT_SUBDIR:
        workdir = workdir.parent
    try:
        found = (workdir / CHECKPOINT_SUBDIR).is_dir()
    except Exception as exc:  # e.g. a bucket that does not exist, or no access
        reason = first_line(exc)
        raise UserError(f"cannot read {path!r} ({reason}); check the path") from exc
    if not found:
        raise UserError(
            f"{path!r} holds no checkpoints/ folder: give the workdir of a finished run "
            "(or an exported .npz file)"
        )
    if config is None:
        saved = saved_config(workdir) or {}
        config = ml_collections.ConfigDict(
            {
                "keep_checkpoints": saved.get("keep_checkpoints", 1),
                "best_metric": saved.get("best_metric", ""),
            }
        )
    checkpoints = RunCheckpoints(workdir, config, read_only=True)
    step = checkpoints.latest_step()
    if step is None:
        raise UserError(f"{checkpoints.directory} holds no finished checkpoint")
    return checkpoints, step
