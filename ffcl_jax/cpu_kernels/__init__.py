"""Optional kernels for XLA:CPU via `jax.ffi`: oneDNN convolutions, and training-mode BatchNorm.

An accelerator of the CPU backend, not part of the method: every op here computes what
`lax.conv_general_dilated` and `batch_norm.batch_norm_train` (followed by a ReLU where asked)
compute, float32 only, so a model gives the same numbers to rounding with or without it.
XLA:CPU's own convolutions are 2-4x slower than oneDNN's on this project's layers, and its
BatchNorm takes several passes over memory (docs/performance_log.md, "oneDNN convolutions for
XLA:CPU").

The BatchNorm is not oneDNN's: oneDNN sums each channel in plain float32, far less exact than
XLA's pairwise reductions where a gradient nearly cancels over a channel. Ours sums in double
(more exact than XLA's) in two memory-bound passes each way, with the ReLU that follows it fused,
and at a residual block's end the add and ReLU that follow it (`batch_norm_add_relu`).

`available()` says whether the library is built (compiling it into a cache on first use, see
`build.py`) and registered; `unavailable_reason()` says why not. The trainer hands the ops to
the layers (`xla_cpu.layer_kernels`, through `models.layers.LayerKernels`) when
`config.cpu.kernels` asks for them; the models never import them.
"""

from __future__ import annotations

import ctypes
import functools

import jax

from ffcl_jax.cpu_kernels import build
from ffcl_jax.cpu_kernels.ops import (  # noqa: F401
    batch_norm_add_relu,
    batch_norm_train,
    conv2d,
    conv2d_transpose,
)

# What the kernels replace in a model, for the records that say which ran (bench results).
OPS = ("convolutions", "transposed_convolutions", "batch_norm_relu", "batch_norm_add_relu")

TARGETS = {
    "ffcl_onednn_conv_forward": "FfclConvForward",
    "ffcl_onednn_conv_inference": "FfclConvInference",
    "ffcl_onednn_conv_backward_data": "FfclConvBackwardData",
    "ffcl_onednn_conv_backward_weights": "FfclConvBackwardWeights",
    "ffcl_batch_norm_forward": "FfclBatchNormForward",
    "ffcl_batch_norm_backward": "FfclBatchNormBackward",
    "ffcl_batch_norm_add_relu_forward": "FfclBatchNormAddReluForward",
    "ffcl_batch_norm_add_relu_backward": "FfclBatchNormAddReluBackward",
}


@functools.cache
def _load() -> str | None:
    """Builds (if needed), loads and registers the library once; the reason it failed, or None."""
    try:
        library = ctypes.cdll.LoadLibrary(str(build.library_path()))
    except build.BuildError as error:
        return str(error)
    except OSError as error:
        return f"the oneDNN kernel library does not load: {error}"
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
        )
    return None


def unavailable_reason() -> str | None:
    """None when the kernels are built and registered, else one line saying why not."""
    return _load()


def available() -> bool:
    return _load() is None


def set_kernel_thread(on: bool) -> bool:
    """Runs the kernels on the library's own thread (True, the default) or on the XLA thread
    that calls each (False), for the whole process; returns the previous setting. For benchmarks
    and tests that compare the two in one process (onednn_kernels.cc, `KernelThread`)."""
    reason = _load()
    if reason:
        raise RuntimeError(reason)
    switch = ctypes.CDLL(str(build.library_path())).FfclSetKernelThread
    switch.restype, switch.argtypes = ctypes.c_int64, [ctypes.c_int64]
    return bool(switch(int(on)))
