#!/usr/bin/env bash
# Sets up, then trains FFCL (teacher ResNet-20, student ResNet-8) on Fashion-MNIST for 3 epochs on
# the CPU and prints the result table. Usage: bash scripts/demo.sh [WORKDIR] [--config.key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORKDIR="${1:-workdirs/fashion_mnist_demo_$(date +%Y%m%d_%H%M%S)}"
shift || true
exec .venv/bin/python -m ffcl_jax.main --config=configs/fashion_mnist.py --workdir="$WORKDIR" "$@"
