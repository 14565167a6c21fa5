#!/usr/bin/env bash
# Sets up, then runs the linter, the formatter check and the tests (CPU only).
#   bash scripts/test.sh            # the fast tier: everything but the tests marked slow (one
#                                   # float64 parity case per method family, one zoo model per
#                                   # family, every pure-function test)
#   bash scripts/test.sh --all      # both tiers (what CI runs): adds every other parity case and
#                                   # zoo model, multi-process and CLI subprocess runs, and the
#                                   # experiment scripts
# Further arguments go to pytest, for example: bash scripts/test.sh -k losses
set -euo pipefail
cd "$(dirname "$0")/.."
TIER=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
  TIER=()
  shift
fi
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
JAX_PLATFORMS=cpu .venv/bin/python -m pytest -q -n 2 --durations=10 ${TIER[@]+"${TIER[@]}"} "$@"
