"""CIFAR-10, FFL/ONE protocol: FFCL with teacher ResNet-110 and student ResNet-32.

The same protocol as `configs/cifar100.py` (SGD Nesterov, lr 0.1, batch 128, 300 epochs, x0.1 at
150/225, wd 1e-4 / 1e-5 on the fusion module, reflect-pad 4 + crop + flip), with CIFAR-10
statistics.

    python -m ffcl_jax.main --config=configs/cifar10.py --workdir=/tmp/ffcl_cifar10

CIFAR-10 comes through TFDS (see configs/cifar100.py for offline preparation). Expect: no
accuracy measured with this codebase yet; ResNet-32 reaches about 93-94% with online KD in the
literature. `:smoke` runs a seconds-long CPU check (accuracy near chance).
"""

from ffcl_jax.config_base import apply_arg, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.dataset = "cifar10"
    return apply_arg(c, arg)
