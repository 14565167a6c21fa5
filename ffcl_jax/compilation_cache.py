"""JAX's persistent compilation cache: compiled steps kept between processes.

Every process compiles the train and eval steps again: seconds on the CPU, minutes for a TPU
slice (`compile_for`), and a pod job pays it on every start, every resume after a preemption and
every `--fresh` run of the same config. JAX's persistent compilation cache keeps the compiled
programs in a directory, keyed by the program, its devices, the compiler options, the XLA flags
and the jax/jaxlib versions, so a process that compiles the same step again loads it. The
directory may be local or `gs://` (JAX reads and writes non-local caches through etils' epath,
which the project installs).

Turning it on sets JAX's process-wide `jax_compilation_cache_dir`, which only the owner of the
process may do: the command line (`python -m ffcl_jax.main`) calls `configure` before anything
compiles. Python code that calls `train.train_and_evaluate` keeps its own JAX settings; it may
call `configure(directory(config, workdir))` first to get what the command line does. The
trainer only reports what the process has (`Counter`). `compile_for` does not turn it on: with
jax 0.10.2 and libtpu 0.0.42.1 JAX writes the programs a compile-only TPU client compiles but
cannot load them ("PjRtCompiler must be constructed with a Client to call
DeserializeLoadedExecutable"), so a second compile of a slice costs what the first did
(docs/performance.md).

JAX writes only programs that took at least `jax_persistent_cache_min_compile_time_secs` (1 s) to
compile: the steps, not the hundreds of small eager operations of model creation, which would
cost more to look up than to compile. Anyone who can write to the directory can run code in
the processes that read it (JAX's warning): keep it where only you write, as a workdir is.
"""

from __future__ import annotations

import jax

from ffcl_jax import storage

SUBDIR = "compilation_cache"  # WORKDIR/compilation_cache by default
OFF = ("", "none")
# jax.monitoring events (jax/_src/compiler.py and compilation_cache.py): a program loaded from
# the cache, a program compiled and written to it, and the compile time a hit saved.
HIT_EVENT = "/jax/compilation_cache/cache_hits"
WRITE_EVENT = "/jax/compilation_cache/cache_misses"
SAVED_EVENT = "/jax/compilation_cache/compile_time_saved_sec"


def directory(config, base=None) -> str | None:
    """Where a run's compiled programs are kept, from `config.compilation_cache_dir`: a folder
    or `gs://` URI as given; `""` or `"none"`: nowhere (the cache off); None (the default): the
    process's own JAX setting (`JAX_COMPILATION_CACHE_DIR`) when it has one, else
    BASE/compilation_cache, where `base` is the run's workdir (None without one)."""
    value = config.compilation_cache_dir
    if value is None:
        if current() is not None:
            return current()
        return None if base is None else str(storage.path(base) / SUBDIR)
    if value.strip().lower() in OFF:
        return None
    return str(storage.path(value))


def configure(path: str | None) -> None:
    """Process setup (command lines only): JAX's persistent compilation cache in `path`, or off
    for None. Call it before anything compiles: JAX opens the cache at the first compilation and
    keeps that one for the life of the process."""
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)


def current() -> str | None:
    """The directory this process's JAX caches compiled programs in; None when it does not."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    return jax.config.jax_compilation_cache_dir or None


def describe() -> str:
    """One line for a run's log: where compiled programs are kept, if anywhere."""
    path = current()
    if path is None:
        return (
            "persistent compilation cache off: every process compiles the steps again "
            "(python -m ffcl_jax.main keeps them in WORKDIR/compilation_cache unless "
            "--config.compilation_cache_dir=none; from Python, call "
            "ffcl_jax.compilation_cache.configure first)"
        )
    return f"persistent compilation cache: {path}"


class Counter:
    """Counts, while open, the programs JAX loads from the persistent cache (hits), those it
    compiles and writes there (writes) and the compile seconds the hits saved; through
    `jax.monitoring` listeners that `close` removes."""

    def __init__(self):
        self.hits = 0
        self.writes = 0
        self.saved_seconds = 0.0
        self._open = True
        jax.monitoring.register_event_listener(self._on_event)
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)

    def _on_event(self, event: str, **kwargs) -> None:
        if event == HIT_EVENT:
            self.hits += 1
        elif event == WRITE_EVENT:
            self.writes += 1

    def _on_duration(self, event: str, duration: float, **kwargs) -> None:
        if event == SAVED_EVENT:
            self.saved_seconds += duration

    def summary(self) -> dict:
        return {
            "dir": current(),
            "hits": self.hits,
            "writes": self.writes,
            "compile_seconds_saved": self.saved_seconds,
        }

    def close(self) -> None:
        if self._open:
            self._open = False
            jax.monitoring.unregister_event_listener(self._on_event)
            jax.monitoring.unregister_event_duration_listener(self._on_duration)

    def __enter__(self) -> Counter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
