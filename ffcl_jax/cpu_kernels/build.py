"""Compiles `onednn_kernels.cc` into a shared library, once per source, jaxlib and oneDNN.

The library goes into a cache (`$FFCL_CPU_KERNELS_CACHE`, else `$XDG_CACHE_HOME/ffcl_jax` or
`~/.cache/ffcl_jax`) under a name hashed from everything that goes into it, so a changed
source, flag or compiler, another jaxlib or another oneDNN builds a new one and stale ones are
never loaded. Builds are atomic (compile to a temporary name, then rename), serialised by a file
lock, so parallel test workers and hosts sharing a home directory build it once, and stopped
after BUILD_TIMEOUT_S. The compiler is `$CXX` (split as a shell would), else g++.

oneDNN comes from the `onednn-cpu-gomp` + `onednn-devel-cpu-gomp` wheels (the `cpu` extra),
which install `lib/libdnnl.so.3` and `include/oneapi/dnnl/` under the environment's prefix;
`$DNNL_ROOT` names another installation.

    python -m ffcl_jax.cpu_kernels.build   # builds (or finds) it and prints its path
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings

SOURCE = pathlib.Path(__file__).with_name("onednn_kernels.cc")
LIBRARY_NAME = "libffcl_onednn.so"


# The longest a build may hold the cache's lock: it takes 10-30 s.
BUILD_TIMEOUT_S = 300.0


class BuildError(RuntimeError):
    """The kernels cannot be built here; the message says why in one line."""


class BuildWarning(UserWarning):
    """The kernels built, and the compiler warned about their source."""


def onednn_root() -> pathlib.Path | None:
    """The oneDNN installation to build against: `$DNNL_ROOT`, else this environment's prefix."""
    candidates = [os.environ.get("DNNL_ROOT"), sys.prefix]
    for root in filter(None, candidates):
        root = pathlib.Path(root)
        if (root / "include/oneapi/dnnl/dnnl.hpp").is_file() and (
            root / "lib/libdnnl.so.3"
        ).exists():
            return root
    return None


def cache_dir() -> pathlib.Path:
    if "FFCL_CPU_KERNELS_CACHE" in os.environ:
        return pathlib.Path(os.environ["FFCL_CPU_KERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "ffcl_jax" / "cpu_kernels"


def compiler_command() -> list[str] | None:
    """The compiler to run, as words: `$CXX` split as a shell would (`CXX="ccache g++"`), else
    g++ or c++ from PATH; None when there is none. Raises BuildError when CXX names no program."""
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        try:
            words = shlex.split(cxx)
        except ValueError as error:
            raise BuildError(f"CXX={cxx!r} does not parse as a command: {error}") from None
        if not words or shutil.which(words[0]) is None:
            raise BuildError(f"CXX={cxx!r} names no program on PATH")
        return words
    found = shutil.which("g++") or shutil.which("c++")
    return [found] if found else None


def kernel_flags(root: pathlib.Path) -> tuple[list[str], list[str]]:
    """The compile flags and the link flags of the kernel library, oneDNN at `root`."""
    import jax

    compile_flags = [
        "-O3",
        "-std=c++17",
        "-fopenmp",  # the BatchNorm loops; the same GNU OpenMP runtime as oneDNN's gomp build
        # The BatchNorm backward recomputes its fused ReLU's mask: it must round as the forward
        # did, so no multiply-add contraction in one and not the other.
        "-ffp-contract=off",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Wextra",
        # Third-party headers as system headers: XLA's FFI headers warn under g++ 12 -Wall, and
        # only our own code's warnings are ours to fix.
        "-isystem",
        str(jax.ffi.include_dir()),
        "-isystem",
        str(root / "include"),
    ]
    link_flags = [f"-L{root / 'lib'}", "-l:libdnnl.so.3", f"-Wl,-rpath,{root / 'lib'}"]
    return compile_flags, link_flags


# g++'s diagnostics (`error:`, `fatal error:`), and GNU ld's failures, whose lines name no
# "error" and come before collect2's `error: ld returned 1 exit status`.
_ERROR_LINE = re.compile(r"\berror\b|undefined reference|cannot find", re.IGNORECASE)


def first_error_line(stderr: str) -> str:
    """The compiler's one line that says what went wrong: the first error, else the last line
    (g++ ends with `compilation terminated.` or a caret line; the linker with collect2's)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if _ERROR_LINE.search(line):
            return line
    return lines[-1] if lines else "(no output)"


def compile_library(
    compiler: list[str],
    source: pathlib.Path,
    output: pathlib.Path,
    compile_flags: list[str],
    link_flags: list[str] | None = None,
    *,
    what: str | None = None,
    timeout: float | None = None,
) -> str:
    """Compiles and links `source` into the shared library `output`; returns the compiler's
    warnings (its stderr; empty when there are none). Raises BuildError, its message
    `compiling WHAT failed: ` and the compiler's first error line, or a line saying it ran
    longer than `timeout` seconds (BUILD_TIMEOUT_S by default)."""
    what = what or source.name
    timeout = BUILD_TIMEOUT_S if timeout is None else timeout
    command = [*compiler, *compile_flags, str(source), "-o", str(output), *(link_flags or [])]
    try:
        # Its own process group: on a timeout the driver's cc1plus and ld are stopped with it.
        # The C locale: diagnostics in English and ASCII, so that an error line says "error".
        process = subprocess.Popen(
            command,
            env={**os.environ, "LC_ALL": "C"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    except OSError as error:
        raise BuildError(f"compiling {what} failed: cannot run {compiler[0]}: {error}") from None
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise BuildError(
            f"compiling {what} took longer than {timeout:g} s and was stopped"
        ) from None
    if process.returncode != 0:
        raise BuildError(f"compiling {what} failed: {first_error_line(stderr)}")
    return stderr


def _fingerprint(
    compiler: list[str], root: pathlib.Path, compile_flags: list[str], link_flags: list[str]
) -> str:
    """A hash of everything the library is built from: source, jaxlib, oneDNN, the compiler
    (its command and version) and every flag."""
    import jaxlib

    try:
        version = subprocess.run(
            [*compiler, "--version"], capture_output=True, text=True, check=False, timeout=60
        ).stdout.split("\n")[0]
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    digest = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        jaxlib.__version__.encode(),
        str(root.resolve()).encode(),
        (root / "include/oneapi/dnnl/dnnl_version.h").read_bytes(),
        version.encode(),
        json.dumps([compiler, compile_flags, link_flags]).encode(),
    ):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _lock(path: pathlib.Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def unsupported_platform() -> str | None:
    """Why this platform cannot have the kernels, or None."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return (
            f"the oneDNN kernels are built for x86-64 Linux only (this is {sys.platform} "
            f"{platform.machine()})"
        )
    return None


def library_path() -> pathlib.Path:
    """The built library, compiling it first if the cache has none. Raises BuildError."""
    reason = unsupported_platform()
    if reason:
        raise BuildError(reason)
    root = onednn_root()
    if root is None:
        raise BuildError(
            "oneDNN not found: install it with `pip install -e .[cpu]` (the onednn-cpu-gomp "
            "wheels) or set DNNL_ROOT"
        )
    compiler = compiler_command()
    if compiler is None:
        raise BuildError("no C++ compiler (g++) to build the oneDNN kernels: install g++")
    compile_flags, link_flags = kernel_flags(root)
    target_dir = cache_dir() / _fingerprint(compiler, root, compile_flags, link_flags)
    target = target_dir / LIBRARY_NAME
    if target.is_file():
        return target
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BuildError(f"cannot create the kernel cache {target_dir}: {error}") from error
    with _lock(target_dir / ".lock"):
        if target.is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target_dir) as scratch:
            partial = pathlib.Path(scratch) / LIBRARY_NAME
            warnings_text = compile_library(
                compiler, SOURCE, partial, compile_flags, link_flags, what="the oneDNN kernels"
            )
            os.replace(partial, target)
    if warnings_text.strip():
        warnings.warn(
            f"the oneDNN kernels compiled with warnings:\n{warnings_text.strip()[-4000:]}",
            BuildWarning,
            stacklevel=2,
        )
    return target


if __name__ == "__main__":
    try:
        print(library_path())
    except BuildError as error:
        sys.exit(f"ffcl_jax.cpu_kernels: {error}")
