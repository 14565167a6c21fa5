#!/usr/bin/env bash
# Sets up, then runs the linter, the formatter check and the whole test suite (CPU only).
# Extra arguments go to pytest, for example: bash scripts/test.sh -k losses
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
JAX_PLATFORMS=cpu .venv/bin/python -m pytest -q -n 2 --durations=10 "$@"
