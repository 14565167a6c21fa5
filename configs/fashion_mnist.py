"""Fashion-MNIST short protocol: FFCL with teacher ResNet-20 and student ResNet-8 on a CPU.

PLACEHOLDER
"""

from ffcl_jax.config_base import apply_smoke, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.dataset = "fashion_mnist"
    c.data_source = "idx"
    c.pad = 2
    c.pad_mode = "constant"
    c.teacher = "resnet20"
    c.student = "resnet8"
    c.num_epochs = 3
    c.lr_decay_epochs = (2,)
    c.loss.rampup_epochs = 1.0
    c.log_every_steps = 50
    if arg == "smoke":
        apply_smoke(c)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; valid: smoke")
    return c
