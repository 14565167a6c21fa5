"""The workdir of a run: start or resume, preemption, and the synchronisation of processes.

A run started in a workdir holding a checkpoint resumes from it; `--fresh` first moves an earlier
run to `previous_runs/` (never deletes it). A run that died before its first checkpoint (a job
killed early and restarted by its scheduler) is moved there the same way when the same command
comes again with the same config, so restart loops need no person. SIGTERM (or, with several
processes, the cluster's preemption notice through orbax) becomes a flag the loop checks between
steps.
"""

from __future__ import annotations

import signal
import threading

import jax

from ffcl_jax import checkpoint, storage
from ffcl_jax.errors import UserError


class Preempted(Exception):
    """SIGTERM (or the cluster's preemption notice) arrived; a checkpoint has been written."""


class PreemptionWatch:
    """Turns SIGTERM into a flag the loop checks between steps. With several processes the
    decision comes from orbax/JAX's preemption sync point, so every process stops at the same
    step."""

    def __init__(self, checkpoints: checkpoint.RunCheckpoints):
        self.checkpoints = checkpoints
        self.requested = False
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.checkpoints.manager.reached_preemption(step)
        return self.requested

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def start_or_resume(
    workdir, config, fresh: bool, is_chief: bool
) -> tuple[checkpoint.RunCheckpoints, int | None, str | None]:
    """Prepares the workdir (local or gs://); returns its checkpoints, the step to resume from
    (None: a new run) and where an earlier run was moved (`--fresh`, or a run with this config
    that stopped before its first checkpoint), if one was.

    Every process reads the workdir and takes the same decision (so a refusal stops them all);
    only process 0 moves anything."""
    workdir = storage.path(workdir)
    storage.prepare_workdir(workdir, jax.process_index())
    resume_step = None
    if not fresh and (workdir / checkpoint.CHECKPOINT_SUBDIR).exists():
        with checkpoint.RunCheckpoints(workdir, config, read_only=True) as existing:
            resume_step = existing.latest_step()
    partial = [
        name
        for name in checkpoint.existing_outputs(workdir)
        if name != checkpoint.CHECKPOINT_SUBDIR
    ]
    move = fresh
    if resume_step is None and partial and not fresh:
        saved = checkpoint.saved_config(workdir)
        if saved is None:
            raise UserError(
                f"workdir {workdir} holds a run ({', '.join(partial)}) but neither a checkpoint "
                "to resume from nor its config.json; pass --fresh to move it aside and start "
                "over, or use a new --workdir (nothing there was changed)"
            )
        differences = checkpoint.config_differences(saved, config, where="then")
        if differences:
            raise UserError(
                f"workdir {workdir} holds a run that stopped before its first checkpoint, "
                "started with another config: "
                + "; ".join(differences)
                + ". Rerun with its values, use a new --workdir, or pass --fresh (the old run "
                "is moved aside, not deleted)"
            )
        move = True  # the same run, restarted: start it over, keeping what it wrote
    sync("ffcl_workdir_checked")
    moved = checkpoint.move_previous_run(workdir) if move and is_chief else None
    sync("ffcl_workdir_ready")
    storage.forget_cached_listings(workdir)
    checkpoints = checkpoint.RunCheckpoints(workdir, config)
    return checkpoints, resume_step, moved
