#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine for ffcl_jax: the Fashion-MNIST data set from Debian
# (dataset-fashion-mnist), g++ from Debian where there is no C++ compiler, a virtual environment
# in .venv with the package, its test tools and the PyTorch reference's torch (CPU wheel), oneDNN
# for the optional CPU kernels (built here with g++; without them training runs on XLA's
# kernels), at the versions in constraints.txt. With
# FFCL_SETUP_TPU=1 (CI sets it) also libtpu, to compile the step for TPU slices
# (ffcl_jax.compile_for): not by default, since an installed libtpu makes every JAX process
# on a CPU machine try a TPU backend first and log its failure.
# Safe to run again: it skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# Installs Debian packages, refreshing the package lists only when the first try fails.
apt_install() {
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "setup: installing $* (Debian package)"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null 2>&1 || {
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
  }
}

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  apt_install dataset-fashion-mnist
fi

# The oneDNN kernels are built for x86-64 Linux with $CXX (its first word the program, as
# ffcl_jax.cpu_kernels.build reads it), else g++ or c++: without one, training quietly runs on
# XLA's slower kernels.
if [ "$(uname -m)" = "x86_64" ]; then
  read -r -a CXX_WORDS <<< "${CXX:-}"
  if [ "${#CXX_WORDS[@]}" -gt 0 ]; then
    command -v "${CXX_WORDS[0]}" >/dev/null \
      || echo "setup: CXX=$CXX names no program; the oneDNN kernels will not build"
  elif ! command -v g++ >/dev/null && ! command -v c++ >/dev/null; then
    apt_install g++
  fi
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
EXTRAS="test,torch,cpu"
NEEDED="import ffcl_jax, pytest, ruff, torch"
if [ "${FFCL_SETUP_TPU:-0}" = "1" ]; then
  EXTRAS="$EXTRAS,tpu"
  NEEDED="$NEEDED, libtpu"
fi
if ! .venv/bin/python -c "$NEEDED" >/dev/null 2>&1 \
   || [ setup.cfg -nt .venv/.installed ] || [ constraints.txt -nt .venv/.installed ]; then
  echo "setup: installing ffcl_jax and its dependencies into .venv (a few minutes the first time)"
  # pip's own output (warnings about the machine's package indexes among it) goes to a log that
  # is shown only when the install fails.
  LOG=.venv/install.log
  if ! { .venv/bin/python -m pip install -q --upgrade pip \
         && .venv/bin/python -m pip install -q -c constraints.txt -e ".[$EXTRAS]"; } >"$LOG" 2>&1
  then
    tail -n 25 "$LOG" >&2
    echo "setup: installing into .venv failed; the whole log is $LOG" >&2
    exit 1
  fi
  touch .venv/.installed
fi
# The oneDNN kernels compile once into ~/.cache/ffcl_jax (about 10 s); where they cannot (no g++,
# not x86-64 Linux), everything runs on XLA's kernels and the trainer says so. One line either
# way: a compiler's error is long, and the build command repeats it in full.
if KERNELS="$(.venv/bin/python -m ffcl_jax.cpu_kernels.build 2>&1)"; then
  echo "setup: oneDNN CPU kernels ready"
else
  WHY="$(grep -m1 '^ffcl_jax.cpu_kernels: ' <<< "$KERNELS" || tail -n1 <<< "$KERNELS")"
  echo "setup: ${WHY}; training will use XLA's CPU kernels" \
    "(.venv/bin/python -m ffcl_jax.cpu_kernels.build says why in full)"
fi
echo "setup: ready (.venv, $(ls /usr/share/datasets/fashion-mnist | wc -l) Fashion-MNIST files)"
