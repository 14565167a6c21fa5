#!/usr/bin/env bash
# The GPU half of the JAX/PyTorch benchmark in one command, for a GPU machine without network
# (such as this project's lent H100/H200: jax, flax, optax, orbax and torch installed; no
# tensorflow, no ml-collections, no CIFAR on disk). It times the cifar100 default pair
# (resnet110 + resnet32, batch 128) in step and epoch mode, JAX with its batches made and
# augmented on the device and random CIFAR-sized images (`--synthetic_data`), and writes
# experiments/results/bench_*_gpu_*.json (copied to $OUT as well when that is set).
#
#   bash experiments/gpu_bench.sh float32      # one call per compute dtype (each about 5 min)
#   bash experiments/gpu_bench.sh bfloat16     # bfloat16 compute, float32 losses
#
# Extra arguments go to bench_step.py (for example --repeats=5 --modes=step). Python packages
# the machine lacks travel as wheels in .whl/ (ignored by git), installed here first:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0
#
# then, with the device tool: run(command="bash experiments/gpu_bench.sh float32",
# carry=[".whl"]); the same with bfloat16; copy the returned JSON files into
# experiments/results/ here and regenerate the README table with
# `python experiments/bench_step.py --readme`.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
dtype=${1:?usage: bash experiments/gpu_bench.sh float32|bfloat16 [bench_step.py flags]}
shift
case "$dtype" in
  float32 | bfloat16) ;;
  *) echo "gpu_bench.sh: compute dtype must be float32 or bfloat16, not '$dtype'" >&2; exit 2 ;;
esac
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$(mktemp -d)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
"$PYTHON" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
"$PYTHON" experiments/bench_step.py --config=configs/cifar100.py --synthetic_data \
  --config.data_on_device=true --config.compute_dtype="$dtype" --repeats=20 "$@" \
  | tee /tmp/gpu_bench_"$dtype".log
if [ -n "${OUT:-}" ]; then  # the device tool brings back what is under $OUT
  cp "$(sed -n 's/^wrote //p' /tmp/gpu_bench_"$dtype".log | tail -1)" \
    /tmp/gpu_bench_"$dtype".log "$OUT"/
fi
