"""Fashion-MNIST short protocol: FFCL with teacher ResNet-20 and student ResNet-8 on a CPU.

The real data set every machine here can install (Debian package `dataset-fashion-mnist`, IDX
files in /usr/share/datasets/fashion-mnist; `--config.data_source=tfds` reads TFDS's
`fashion_mnist` instead). 60k train / 10k test images of 28x28x1, 10 classes.

Protocol: the FFL/ONE optimiser (SGD Nesterov 0.9, lr 0.1, batch 128, wd 1e-4, fusion 1e-5)
compressed to 3 epochs: lr x0.1 at epoch 2, ramp-up R = 1 epoch for the methods that have one
(w = exp(-5) in epoch 1, then 1: a step; DML, KDCL and KD keep none).
Augmentation: zero-pad 2 + random 28x28 crop + horizontal flip. Zero padding rather than reflect
because the images lie on a black background, and flips because garments are near-symmetric
(the usual Fashion-MNIST choice); normalised with the training set's mean 0.2860 / std 0.3530.

    python -m ffcl_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/ffcl_fmnist

This is the method study's protocol. A run took 9m45s on a 2-core AVX-512 CPU (2026-11-25) and
28m13s on a 2-core AVX2 one (2026-11-29), ending at test top-1 of about 89% for the student and
91% for the teacher and the fused classifier (docs/running.md). The run is deterministic for a
given seed.

`--config=configs/fashion_mnist.py:demo` (the README's demo) trains on the first 20,000 images:

    python -m ffcl_jax.main --config=configs/fashion_mnist.py:demo --workdir=/tmp/demo

4m37s on a 2-core AVX-512 CPU, test top-1 84.6% student, 88.6% teacher, 88.8% fused, 87.6%
ensemble (seed 0, 2026-12-01, experiments/results/fashion_mnist_demo.json).

`--config=configs/fashion_mnist.py:smoke` (resnet14 + resnet8, 512 images, 2 epochs) takes
about 15 s and only shows that everything runs (test top-1 40-50%).
"""

from ffcl_jax.config_base import apply_arg, base_config


def get_config(arg: str | None = None):
    """`arg`: None (the study's protocol), "demo" (the README's demo: the first 20,000 training
    images, the whole test split) or "smoke"."""
    c = base_config()
    c.dataset = "fashion_mnist"
    c.data_source = "idx"
    c.pad = 2
    c.pad_mode = "constant"
    c.teacher = "resnet20"
    c.student = "resnet8"
    c.num_epochs = 3
    c.lr_decay_epochs = (2,)
    c.protocol_rampup_epochs = 1.0
    c.log_every_steps = 50
    if arg == "demo":
        c.train_examples = 20_000
        return c
    return apply_arg(c, arg)
