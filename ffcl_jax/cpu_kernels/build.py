"""Compiles `onednn_kernels.cc` into a shared library, once per source, jaxlib and oneDNN.

The library goes into a cache (`$FFCL_CPU_KERNELS_CACHE`, else `$XDG_CACHE_HOME/ffcl_jax` or
`~/.cache/ffcl_jax`) under a name hashed from everything that goes into it, so a changed
source, another jaxlib or another oneDNN builds a new one and stale ones are never loaded.
Builds are atomic (compile to a temporary name, then rename) and serialised by a file lock, so
parallel test workers and hosts sharing a home directory build it once.

oneDNN comes from the `onednn-cpu-gomp` + `onednn-devel-cpu-gomp` wheels (the `cpu` extra),
which install `lib/libdnnl.so.3` and `include/oneapi/dnnl/` under the environment's prefix;
`$DNNL_ROOT` names another installation.

    python -m ffcl_jax.cpu_kernels.build   # builds (or finds) it and prints its path
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile

SOURCE = pathlib.Path(__file__).with_name("onednn_kernels.cc")
LIBRARY_NAME = "libffcl_onednn.so"


class BuildError(RuntimeError):
    """The kernels cannot be built here; the message says why in one line."""


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


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _compile_command(compiler: str, root: pathlib.Path, output: pathlib.Path) -> list[str]:
    import jax

    return [
        compiler,
        "-O3",
        "-std=c++17",
        "-fopenmp",  # the BatchNorm loops; the same GNU OpenMP runtime as oneDNN's gomp build
        # The BatchNorm backward recomputes its fused ReLU's mask: it must round as the forward
        # did, so no multiply-add contraction in one and not the other.
        "-ffp-contract=off",
        "-shared",
        "-fPIC",
        "-w",  # XLA's FFI headers warn under g++ 12; nothing of ours is hidden by this
        f"-I{jax.ffi.include_dir()}",
        f"-I{root / 'include'}",
        str(SOURCE),
        "-o",
        str(output),
        f"-L{root / 'lib'}",
        "-l:libdnnl.so.3",
        f"-Wl,-rpath,{root / 'lib'}",
    ]


def _fingerprint(compiler: str, root: pathlib.Path) -> str:
    import jaxlib

    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout.split("\n")[0]
    digest = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        jaxlib.__version__.encode(),
        str(root.resolve()).encode(),
        (root / "include/oneapi/dnnl/dnnl_version.h").read_bytes(),
        version.encode(),
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
    compiler = _compiler()
    if compiler is None:
        raise BuildError("no C++ compiler (g++) to build the oneDNN kernels: install g++")
    target_dir = cache_dir() / _fingerprint(compiler, root)
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
            result = subprocess.run(
                _compile_command(compiler, root, partial), capture_output=True, text=True
            )
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise BuildError(f"compiling the oneDNN kernels failed: {last}")
            os.replace(partial, target)
    return target


if __name__ == "__main__":
    try:
        print(library_path())
    except BuildError as error:
        sys.exit(f"ffcl_jax.cpu_kernels: {error}")
