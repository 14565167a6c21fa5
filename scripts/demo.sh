#!/usr/bin/env bash
# Sets up, then trains FFCL (teacher ResNet-20, student ResNet-8) on the first 20,000 Fashion-MNIST
# training images for 3 epochs on the CPU (configs/fashion_mnist.py:demo) and prints the result
# table. Extra arguments go to ffcl_jax.main, for example
#   bash scripts/demo.sh --workdir=/tmp/demo --config.method=dml
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m ffcl_jax.main --config=configs/fashion_mnist.py:demo \
  --workdir="workdirs/fashion_mnist_demo_$(date +%Y%m%d_%H%M%S)" "$@"
