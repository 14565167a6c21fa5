"""Runs a Python entry point of the repository in a subprocess, as a user's shell would."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_python(*args: str, env: dict | None = None, timeout: int = 600):
    """`python *args` in the repository root, with this process's environment, the repository
    first on PYTHONPATH, JAX on the CPU, TensorFlow quiet, and `env` on top."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    full_env = dict(
        os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONPATH=path, **(env or {})
    )
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
