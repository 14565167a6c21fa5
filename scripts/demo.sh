#!/usr/bin/env bash
# Sets up, then trains FFCL (teacher ResNet-20, student ResNet-8) on Fashion-MNIST for 3 epochs on
# the CPU and prints the result table. Extra arguments go to ffcl_jax.main, for example
#   bash scripts/demo.sh --workdir=/tmp/demo --config.method=dml
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m ffcl_jax.main --config=configs/fashion_mnist.py \
  --workdir="workdirs/fashion_mnist_demo_$(date +%Y%m%d_%H%M%S)" "$@"
