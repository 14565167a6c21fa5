"""CIFAR-100, FFL/ONE protocol: FFCL with teacher ResNet-110 and student ResNet-32.

SGD Nesterov 0.9, lr 0.1, batch 128, 300 epochs, lr x0.1 at epochs 150 and 225, weight decay
1e-4 on the networks and 1e-5 on the fusion module; reflect-pad 4 + random 32x32 crop +
horizontal flip; CIFAR-100 channel mean/std.

    python -m ffcl_jax.main --config=configs/cifar100.py --workdir=/tmp/ffcl_cifar100

CIFAR-100 comes through TFDS: it is downloaded where the network allows; elsewhere prepare it with
`tfds build cifar100 --data_dir DIR` and add `--config.data_dir=DIR`. Expect: a full run is
300 epochs of 390 steps; no accuracy for this codebase has been measured on CIFAR-100 yet (the
machines it was written on cannot download CIFAR). For reference, the FFL paper reports about
74% for a ResNet-32 student trained with FFL.

Accelerators (no run on either was made for this repository; docs/running.md):

    # one GPU node, 1-8 GPUs: the protocol in bfloat16, the training split on the GPUs
    python -m ffcl_jax.main --config=configs/cifar100.py:gpu --workdir=gs://BUCKET/c100_gpu
    # a TPU pod slice, the same command on every worker: global batch 1024, lr 0.8 after 5
    # warm-up epochs (a larger batch than the protocol's: compare with runs of that batch)
    gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="cd ffcl_jax && \
        python -m ffcl_jax.main --config=configs/cifar100.py:tpu --workdir=gs://BUCKET/c100_tpu \
        --config.data_dir=gs://BUCKET/tensorflow_datasets"

`--config=configs/cifar100.py:smoke` runs a seconds-long CPU check (resnet14 + resnet8, 512
images, 2 epochs); its accuracy is near chance and only shows that the pipeline runs.
"""

from ffcl_jax.config_base import apply_arg, base_config


def get_config(arg: str | None = None):
    c = base_config()
    c.dataset = "cifar100"
    return apply_arg(c, arg)
