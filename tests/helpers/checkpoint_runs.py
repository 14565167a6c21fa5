"""The tiny command-line run that the checkpoint tests interrupt and resume, on a local
workdir (tests/test_checkpoint.py) and on gs:// (tests/test_gcs.py)."""

from __future__ import annotations

import numpy as np

from tests.helpers.cli import run_python

EPOCHS, STEPS_PER_EPOCH = 4, 4
# A tiny run through the real command line, with augmentation on, so the data pipeline's
# position is part of what a resume must restore.
CLI_ARGS = [
    "--config=configs/fashion_mnist.py:smoke",
    "--config.teacher=resnet8",
    "--config.train_examples=128",
    "--config.test_examples=70",
    "--config.batch_size=32",
    "--config.eval_batch_size=35",
    f"--config.num_epochs={EPOCHS}",
    "--config.lr_decay_epochs=(3,)",
    "--config.log_every_steps=3",
]


# `python -c` this with the CLI's arguments: the CLI, with SIGTERM arriving at the second batch of
# epoch 3 (a preemption notice mid-epoch).
PREEMPT_IN_EPOCH_3 = (
    "import os, signal, sys\n"
    "from ffcl_jax import input_pipeline, main\n"
    "epoch_fn = input_pipeline.TrainData.epoch\n"
    "def epoch(self, e, **kw):\n"
    "    for i, batch in enumerate(epoch_fn(self, e, **kw)):\n"
    "        if e == 2 and i == 1:\n"
    "            os.kill(os.getpid(), signal.SIGTERM)\n"
    "        yield batch\n"
    "input_pipeline.TrainData.epoch = epoch\n"
    "sys.argv = ['main', *sys.argv[1:]]\n"
    "main.run()\n"
)


def run(*args, entry: tuple[str, ...] = ("-m", "ffcl_jax.main"), env: dict | None = None):
    """The CLI (or `entry`) in a subprocess, with `env` added to this process's environment."""
    return run_python(*entry, *args, env=env)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not different, f"{len(different)} arrays differ, first {different[0]}"
