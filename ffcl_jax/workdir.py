"""The workdir of a run: start or resume, preemption, and the synchronisation of processes.

A run started in a workdir holding a checkpoint resumes from it; `--fresh` first moves an earlier
run to `previous_runs/` (never deletes it). SIGTERM (or, with several processes, the cluster's
preemption notice through orbax) becomes a flag the loop checks between steps.
"""

from __future__ import annotations

import os
import signal
import threading

import jax

from ffcl_jax import checkpoint
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
    workdir: str, config, fresh: bool, is_chief: bool
) -> tuple[checkpoint.RunCheckpoints, int | None, str | None]:
    """Prepares the workdir; returns its checkpoints, the step to resume from (None: a new run)
    and, for --fresh, where an earlier run was moved."""
    moved = None
    if is_chief:
        os.makedirs(workdir, exist_ok=True)
        if fresh:
            moved = checkpoint.move_previous_run(workdir)
    sync("ffcl_workdir_ready")
    had_outputs = [
        name
        for name in checkpoint.existing_outputs(workdir)
        if name != checkpoint.CHECKPOINT_SUBDIR
    ]
    resume_step = None
    if os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_SUBDIR)):
        with checkpoint.RunCheckpoints(workdir, config, read_only=True) as existing:
            resume_step = existing.latest_step()
    if resume_step is None and had_outputs:
        raise UserError(
            f"workdir {workdir!r} holds a run ({', '.join(had_outputs)}) but no checkpoint to "
            "resume from (it stopped before its first checkpoint, or an older version wrote it); "
            "pass --fresh to move it aside and start over, or use a new --workdir "
            "(nothing there was changed)"
        )
    sync("ffcl_workdir_checked")
    checkpoints = checkpoint.RunCheckpoints(workdir, config)
    return checkpoints, resume_step, moved
