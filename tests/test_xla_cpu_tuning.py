"""The XLA:CPU tuning keeps a ResNet's backward pass linear in depth, read off the compiled HLO.

XLA:CPU's default loop fusion copies the forward residual + ReLU chain of a stage into each
backward consumer, so the largest fusion of the compiled step holds one copy of every earlier
block: its size grows with the depth, and the work with depth^2. With
`cpu.ynn_fusion="eltwise_reduce"` and the closed-form BatchNorm backward (what "auto" picks for
deep networks) the largest fusion must not grow with the depth. The control compiles the same
steps with XLA's defaults and must show the growth, so a change of XLA that fixes (or moves) the
defect is noticed too.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from ffcl_jax import train, xla_cpu
from ffcl_jax.config_base import base_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU behaviour")


def computations(hlo_text: str) -> dict[str, str]:
    """The computations of an optimized HLO module by name, each with its text."""
    chunks = re.split(r"\n(?=\S)", hlo_text)
    return {
        match.group(1): chunk for chunk in chunks if (match := re.match(r"%?([\w.\-]+)", chunk))
    }


def largest_fusion(hlo_text: str) -> int:
    """Instructions in the largest fused computation of an optimized HLO module."""
    sizes = [
        body.count("\n")
        for name, body in computations(hlo_text).items()
        if name.startswith("fused_computation")
    ]
    assert sizes, "no fused computations found: has the HLO text format changed?"
    return max(sizes)


def compiled_step_hlo(teacher: str, ynn_fusion: str, bn_backward: str) -> str:
    config = base_config()
    config.dataset = "cifar10"
    config.teacher, config.student = teacher, "resnet8"
    config.method = "independent"  # the networks' own backward passes, nothing else
    config.batch_size = 4
    config.cpu.ynn_fusion = ynn_fusion
    config.batch_norm_backward = bn_backward
    config.cpu.kernels = "xla"  # these tests are about XLA's own kernels and fusions
    return compiled_cifar_step(config)


def compiled_cifar_step(config) -> str:
    """The optimized HLO text of the train step for `config` on CIFAR-shaped batches."""
    settings = train.check_config(config, jax.device_count())
    setup, state = train.build(config, settings, steps_per_epoch=10)
    train_step, _ = train.jit_steps(setup, config)
    batch = {
        "image": jax.ShapeDtypeStruct((config.batch_size, 32, 32, 3), jnp.uint8),
        "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32),
    }
    return train_step.lower(state, batch).compile().as_text()


def test_auto_picks_the_linear_setting_for_deep_networks():
    deep = {
        "xla_cpu_experimental_ynn_fusion_type": (
            "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"
        )
    }
    shallow = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
    config = base_config()
    config.teacher, config.student = "resnet110", "resnet32"
    assert xla_cpu.compiler_options(config) == deep
    config.student = "wrn_40_1"  # 6 blocks a stage: the deeper network decides
    config.teacher = "resnet8"
    assert xla_cpu.compiler_options(config) == deep
    config.teacher, config.student = "resnet20", "resnet8"  # shallow: reductions only
    assert xla_cpu.compiler_options(config) == shallow
    config.cpu.ynn_fusion = "xla_default"
    assert xla_cpu.compiler_options(config) is None
    config.cpu.ynn_fusion = "dot"
    assert xla_cpu.compiler_options(config) == {
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
    }


@pytest.mark.slow
def test_largest_fusion_does_not_grow_with_depth():
    # What "auto" runs for deep networks, compiled at two depths.
    shallow = largest_fusion(compiled_step_hlo("resnet20", "eltwise_reduce", "closed_form"))
    deep = largest_fusion(compiled_step_hlo("resnet56", "eltwise_reduce", "closed_form"))
    assert deep <= 1.2 * shallow, (
        f"largest fusion {deep} instructions at 9 blocks/stage vs {shallow} at 3: the "
        "backward pass recomputes the forward chain again (quadratic in depth)"
    )
    # Control: XLA's default fusion shows the defect this setting avoids.
    default_shallow = largest_fusion(compiled_step_hlo("resnet20", "xla_default", "autodiff"))
    default_deep = largest_fusion(compiled_step_hlo("resnet56", "xla_default", "autodiff"))
    assert default_deep >= 1.8 * default_shallow, (
        f"XLA's default fusion no longer grows with depth ({default_shallow} -> {default_deep}):"
        " re-measure whether cpu.ynn_fusion='auto' still pays off (experiments/bench_step.py)"
    )


def ynn_fusion_ops(hlo_text: str) -> collections.Counter:
    """How many YNNPACK fusions of an optimized HLO module hold each kind of op."""
    bodies = computations(hlo_text)
    held = collections.Counter()
    for match in re.finditer(r"%ynn_fusion[.\d]* = .*?calls=%([\w.\-]+)", hlo_text):
        body = bodies.get(match.group(1), "")
        held.update(op for op in ("convolution", "reduce") if re.search(rf" {op}\(", body))
    return held


@pytest.mark.slow
def test_shallow_setting_leaves_convolutions_to_xla():
    # XLA's default list sends convolutions to YNNPACK, whose kernels are 2x slower at these
    # channel counts; "auto" for a shallow pair keeps only BatchNorm's reductions there.
    auto = ynn_fusion_ops(compiled_step_hlo("resnet20", "auto", "autodiff"))
    assert auto["reduce"] > 0 and auto["convolution"] == 0, auto
    # Control: the default still takes convolutions (else re-measure what "auto" is for).
    default = ynn_fusion_ops(compiled_step_hlo("resnet20", "xla_default", "autodiff"))
    assert default["convolution"] > 0, default


# A fresh process (XLA reads XLA_FLAGS once, when JAX starts its backend): what the CLI does
# first, then the number of copies in the compiled FFCL step of a small pair.
COPIES_IN_A_FRESH_PROCESS = """
import os
import sys
from ffcl_jax import xla_cpu
from ffcl_jax.config_base import base_config

config = base_config()
config.dataset, config.teacher, config.student = "cifar10", "resnet8", "resnet8"
config.batch_size = 32
config.cpu.kernels = "xla"
config.cpu.flatten_after_fusion = sys.argv[1] == "on"
os.environ["XLA_FLAGS"] = xla_cpu.process_xla_flags(config, os.environ.get("XLA_FLAGS", ""))
print("flags:", os.environ["XLA_FLAGS"])
sys.path.insert(0, "tests")
from test_xla_cpu_tuning import compiled_cifar_step  # starts the backend, after the line above

print("copies:", compiled_cifar_step(config).count(" copy("))
"""


def copies_in_a_fresh_process(flatten: str) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    done = subprocess.run(
        [sys.executable, "-c", COPIES_IN_A_FRESH_PROCESS, flatten],
        cwd=REPO,
        env={**env, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    flags = re.search(r"flags: (.*)", done.stdout).group(1)
    return flags, int(re.search(r"copies: (\d+)", done.stdout).group(1))


@pytest.mark.slow
def test_flatten_after_fusion_reaches_xla_and_removes_copies():
    flags, with_flag = copies_in_a_fresh_process("on")
    assert flags == xla_cpu.FLATTEN_AFTER_FUSION_FLAG
    flags, without = copies_in_a_fresh_process("off")
    assert flags == ""
    # Fewer copies only if XLA got the flag before its backend started (else the counts are
    # equal); if a new XLA makes no difference here, re-measure whether the flag still pays.
    assert with_flag < without, (with_flag, without)


def test_process_xla_flags_keep_the_users_own_and_edit_nothing():
    config = base_config()
    current = "--xla_force_host_platform_device_count=2"
    flags = xla_cpu.process_xla_flags(config, current)
    assert flags == f"{current} {xla_cpu.FLATTEN_AFTER_FUSION_FLAG}"
    assert xla_cpu.process_xla_flags(config, flags) == flags  # not twice
    users = "--xla_backend_extra_options=xla_cpu_use_fusion_emitters"
    assert xla_cpu.process_xla_flags(config, users) == users  # the user's own choice stays
    config.cpu.flatten_after_fusion = False
    assert xla_cpu.process_xla_flags(config, current) == current
    # Importing the library and building a step leave the process's XLA_FLAGS alone.
    before = os.environ.get("XLA_FLAGS")
    xla_cpu.compiler_options(config)
    assert os.environ.get("XLA_FLAGS") == before
