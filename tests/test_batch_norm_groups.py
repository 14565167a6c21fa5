"""`config.batch_norm="groups:N"`: BatchNorm statistics over groups of N devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ffcl_jax.config_base import batch_norm_groups, check_config
from ffcl_jax.errors import UserError
from tests.conftest import REPO, tiny_config


def test_groups_are_consecutive_devices_and_must_divide_them():
    assert batch_norm_groups("groups:2", 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert batch_norm_groups("groups:8", 8) == [list(range(8))]
    assert batch_norm_groups("groups:1", 2) == [[0], [1]]
    assert batch_norm_groups("global", 8) is None
    assert batch_norm_groups("per_device", 8) is None
    with pytest.raises(UserError, match="groups of 3 devices do not divide the 8 devices"):
        batch_norm_groups("groups:3", 8)
    for bad in ("groups:0", "groups:", "groups:two", "group:2", "sync"):
        with pytest.raises(UserError, match="valid: global, per_device, or groups:N"):
            batch_norm_groups(bad, 8)


def test_check_config_refuses_a_group_size_that_does_not_divide_the_devices(fmnist_dir):
    config = tiny_config(fmnist_dir, batch_norm="groups:3", batch_size=36)
    with pytest.raises(UserError, match="groups of 3 devices do not divide the 4 devices"):
        check_config(config, 4)
    config.batch_norm = "groups:2"
    check_config(config, 4)


@pytest.mark.slow
def test_group_statistics_on_eight_devices(fmnist_dir):
    """One step on 8 forced CPU devices (4 rows each): groups of 2 devices compute the mean of
    four one-device steps on each group's 8 rows (the first step's update is linear in the
    gradient), which is neither the global nor the per-device step; groups of 1 are the
    per-device step and one group of 8 the global one, to float rounding."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run(
        [sys.executable, "tests/helpers/batch_norm_groups.py", fmnist_dir],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result["groups_2_vs_mean_of_group_steps"] <= 1e-5
    assert result["loss_vs_mean_of_group_losses"] <= 1e-5
    assert result["groups_2_vs_global"] > 1e-4  # a different normalisation from both
    assert result["groups_2_vs_per_device"] > 1e-4
    assert result["groups_1_vs_per_device"] <= 1e-5
    assert result["groups_8_vs_global"] <= 2e-5  # as global over 8 devices against 1
    reduces = result["all_reduces"]
    # Statistics cross devices in every BatchNorm layer under groups, as under global.
    assert reduces["groups:2"] > reduces["per_device"] >= 1
