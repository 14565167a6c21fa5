"""Runs `python -m ffcl_jax.main ARGS` and SIGKILLs itself around the checkpoint save of a step.

    python tests/helpers/kill_at_checkpoint.py STEP after|during|before MAIN_ARGS...

`after`: once the save of STEP has completed (a preemption between epochs); `during`: as soon as
the save of STEP has started writing in the background (a crash in the middle of a save);
`before`: just before the save of STEP starts (with STEP the first checkpoint: a job killed
before it ever saved).
"""

from __future__ import annotations

import os
import signal
import sys

from ffcl_jax import checkpoint, main


def install(kill_step: int, mode: str) -> None:
    original_save = checkpoint.RunCheckpoints.save

    def save(self, step, *args, **kwargs):
        if step == kill_step and mode == "before":
            print(f"killing the process before the checkpoint of step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        original_save(self, step, *args, **kwargs)
        if step == kill_step:
            if mode == "after":
                self.wait()
            print(f"killing the process at the checkpoint of step {step} ({mode})", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.RunCheckpoints.save = save


if __name__ == "__main__":
    install(int(sys.argv[1]), sys.argv[2])
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    main.run()
