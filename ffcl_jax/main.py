"""Command line: `python -m ffcl_jax.main --config=configs/cifar100.py --workdir=DIR`.

Any config value can be overridden with `--config.key=value` (for example
`--config.method=dml`, `--config.loss.lam_feat=0`, `--config.num_epochs=10`); a config file takes
an argument after a colon (`--config=configs/fashion_mnist.py:smoke`). Bad input ends with one
`error: ...` line that says what to do, and exit status 2.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import threading

from absl import app, flags, logging
from ml_collections import config_flags

from ffcl_jax.errors import parse_flags_or_exit

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/fashion_mnist.py", "Training configuration file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "Directory for logs, checkpoints and results. A run started in a workdir holding a "
    "checkpoint resumes from it.",
)
_FRESH = flags.DEFINE_bool(
    "fresh",
    False,
    "Start over even if the workdir holds a run; its files are moved to "
    "WORKDIR/previous_runs/<time>/, never deleted.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 for multi-host runs (or set JAX_COORDINATOR_ADDRESS).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
# 128 + SIGTERM, as a shell reports a process stopped by SIGTERM: schedulers requeue on it.
PREEMPTED_EXIT_CODE = 143
# Set by `cli()` only: whether this process may restart itself (see restart_with_malloc).
_MAY_RESTART = False


def multi_process_environment(env=os.environ) -> bool:
    """Whether the environment describes a run of several processes.

    A single-task SLURM or MPI job, or a single-host TPU VM, is one process: initialising the
    distributed runtime there would only add a coordinator to wait for.
    """
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    for count_var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(env.get(count_var, "1") or "1") > 1:
            return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def _initialize_distributed() -> None:
    """Joins a multi-process run when the flags or the environment describe one.

    Explicit flags win; otherwise `jax.distributed.initialize()` auto-detects the cluster (Cloud
    TPU pod slices, SLURM, Open MPI, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID).
    """
    import jax

    if _COORDINATOR.value or _NUM_PROCESSES.value is not None:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    elif multi_process_environment():
        jax.distributed.initialize()


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not _WORKDIR.value:
        print("error: --workdir is required (a folder for logs and results)", file=sys.stderr)
        sys.exit(2)
    restart_if_asked(_CONFIG.value)
    logging.set_verbosity(logging.WARNING)
    from ffcl_jax import compilation_cache, xla_cpu
    from ffcl_jax.datasets import import_tensorflow
    from ffcl_jax.errors import UserError
    from ffcl_jax.train import train_and_evaluate
    from ffcl_jax.workdir import Preempted

    # XLA reads XLA_FLAGS once, when JAX starts its backend: set them before anything does.
    os.environ["XLA_FLAGS"] = xla_cpu.process_xla_flags(
        _CONFIG.value, os.environ.get("XLA_FLAGS", "")
    )
    if _CONFIG.value.compute_dtype == "float64":  # exact comparisons: 64-bit arrays throughout
        import jax

        jax.config.update("jax_enable_x64", True)
    import_tensorflow()
    _initialize_distributed()
    # Before anything compiles: a resumed or restarted run loads the steps it compiled before.
    compilation_cache.configure(compilation_cache.directory(_CONFIG.value, _WORKDIR.value))
    try:
        train_and_evaluate(
            _CONFIG.value,
            _WORKDIR.value,
            fresh=_FRESH.value,
            command=" ".join(["python -m ffcl_jax.main", *sys.argv[1:]]),
        )
    except UserError as exc:
        _exit_now(2, f"error: {exc}")
    except Preempted as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)


def _mute_background_reports() -> None:
    """After a failed restore, orbax/tensorstore callbacks still running in their threads report
    the failure again into an event loop that is already closed ("Event loop is closed"
    tracebacks, asyncio's "Task exception was never retrieved"). The run is about to stop with
    one clear error, so exactly those reports are dropped; every other exception is reported as
    before."""

    def is_echo(exc) -> bool:
        return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)

    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)
    previous_excepthook = sys.excepthook
    previous_unraisable = sys.unraisablehook
    previous_thread_hook = threading.excepthook
    sys.excepthook = lambda t, e, tb: None if is_echo(e) else previous_excepthook(t, e, tb)
    sys.unraisablehook = lambda u: None if is_echo(u.exc_value) else previous_unraisable(u)
    threading.excepthook = lambda a: None if is_echo(a.exc_value) else previous_thread_hook(a)


def _exit_now(code: int, message: str) -> None:
    """Prints `message` as the last line of stderr and exits.

    After a failed checkpoint restore, tensorstore callbacks may still print tracebacks of the
    same failure from their threads for a moment (see `_mute_background_reports`);
    they are given that moment, then stderr is closed to them, so the line that says what to do
    always comes last.
    """
    import time

    _mute_background_reports()
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(0.3)
    stderr_copy = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.write(stderr_copy, (message + "\n").encode())
    sys.exit(code)


def restart_with_malloc(choice: str) -> None:
    """Replaces this process with the same command line under glibc's malloc tunables for
    `choice` (`process_env`), where they take effect and no malloc tunable is set yet; else
    returns. For the command line only: a script, a notebook's kernel or a test that calls
    `run()` must never be replaced by a re-run of its own command line."""
    from ffcl_jax import process_env

    env = process_env.with_malloc(dict(os.environ), choice)
    if env is None:
        return
    # exec runs no exit handlers: what is still in Python's stdio buffers would be lost.
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def restart_if_asked(config) -> None:
    """Restarts with `config.cpu.malloc`'s tunables where the command line runs (`cli()`);
    else returns. An unknown choice is left to the config check, which says what is valid."""
    from ffcl_jax import process_env

    if _MAY_RESTART and config.cpu.malloc in process_env.MALLOC_CHOICES:
        restart_with_malloc(config.cpu.malloc)


def run() -> None:
    """Trains as `sys.argv` says, in this process: what the command line runs, and what Python
    code (a script, a test) may call; it never restarts the process."""
    app.run(main, flags_parser=parse_flags_or_exit)


def cli() -> None:
    """`python -m ffcl_jax.main`: `run()`, restarted once with `config.cpu.malloc`'s tunables
    where they take effect (glibc reads its tunables at start-up only)."""
    global _MAY_RESTART
    _MAY_RESTART = True
    run()


if __name__ == "__main__":
    cli()
