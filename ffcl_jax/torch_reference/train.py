"""Train/eval loop of the PyTorch reference: the same configs, data, presets and outputs.

    python -m ffcl_jax.torch_reference.train --config=configs/fashion_mnist.py --workdir=DIR

Reads a config of `configs/` (every `--config.key=value` override works), the same splits
(`ffcl_jax.datasets.load_split`: numpy arrays), and writes `results.json` with the same
`history` / `summary` layout as the JAX trainer, plus `metrics.jsonl`. Augmentation is done in
torch (pad, random crop, horizontal flip; a `torch.Generator` seeded per epoch), no torchvision.
Runs on the CPU, or on CUDA when available (`--device`); `--config.compute_dtype=bfloat16`
runs the networks under `torch.autocast` (bfloat16), with float32 weights and loss terms.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from absl import app, flags
from ml_collections import config_flags

from ffcl_jax import class_balance, datasets, input_pipeline, methods, report, storage
from ffcl_jax.torch_reference import optim
from ffcl_jax.torch_reference.methods import (
    mirror,
    pair_evaluated,
    pause_members,
    settings_mapping,
)


def augment(images: torch.Tensor, config, generator: torch.Generator) -> torch.Tensor:
    """Pad + random crop (+ flip) of a uint8 NCHW batch, per example."""
    if config.augment == "none":
        return images
    n, _, h, w = images.shape
    pad = int(config.pad)
    mode = "reflect" if config.pad_mode == "reflect" else "constant"
    padded = F.pad(images.float(), (pad, pad, pad, pad), mode=mode)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    channels = torch.arange(images.shape[1])[None, :, None, None]
    out = padded[batch, channels, rows, cols]
    if config.augment == "pad_crop_flip":
        flip = torch.rand(n, generator=generator) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out


def normalize(images: torch.Tensor, info) -> torch.Tensor:
    """uint8 NCHW (or batch x views x C x H x W) -> float32 standardised per channel."""
    shape = (-1, 1, 1)  # channels, then the two spatial axes
    mean = torch.tensor(info.mean, dtype=torch.float32).view(shape) * 255
    std = torch.tensor(info.std, dtype=torch.float32).view(shape) * 255
    return (images.float() - mean.to(images.device)) / std.to(images.device)


class TemporalMean:
    """PCL's temporal mean of a cohort: an EMA of its parameters, mean <- d mean + (1 - d) p with
    d = min(1 - 1/(step + 1), decay), after every optimizer step; its BatchNorm statistics are
    its own, updated by its training-mode passes (`ffcl_jax.steps`)."""

    def __init__(self, cohort: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(cohort)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.decay, self.step = decay, 0

    @torch.no_grad()
    def branch_logits(self, images):
        self.model.train()
        return self.model(images)["branch_logits"]

    @torch.no_grad()
    def update(self, cohort: torch.nn.Module) -> None:
        d = min(1.0 - 1.0 / (self.step + 1), self.decay)
        for mean, p in zip(self.model.parameters(), cohort.parameters(), strict=True):
            mean.mul_(d).add_(p, alpha=1 - d)
        self.step += 1


def epoch_batches(
    images_nchw,
    labels,
    config,
    epoch: int,
    steps: int,
    num_views: int = 1,
    images_per_class: int = 0,
):
    """The augmented uint8 batches of one epoch: a seeded permutation (or, with
    `images_per_class`, the JAX trainer's class-balanced batches), then pad/crop/flip;
    `num_views > 1` draws that many augmentations of every image (batch x views x C x H x W)."""
    generator = torch.Generator().manual_seed(int(config.seed) * 1_000_003 + epoch)
    if images_per_class:
        seed = class_balance.class_balanced_seed(config, epoch)
        order = torch.from_numpy(
            class_balance.class_balanced_order(
                labels.numpy(), images_per_class, config.batch_size, steps, seed
            )
        )
    else:
        order = torch.randperm(len(images_nchw), generator=generator)
    for b in range(steps):
        index = order[b * config.batch_size : (b + 1) * config.batch_size]
        if num_views == 1:
            yield augment(images_nchw[index], config, generator), labels[index]
        else:
            views = [augment(images_nchw[index], config, generator) for _ in range(num_views)]
            yield torch.stack(views, dim=1), labels[index]


def autocast(device: str, compute_dtype: str = "float32"):
    """`config.compute_dtype` as a PyTorch user runs it: bfloat16 is `torch.autocast` (weights,
    optimizer and BatchNorm statistics stay float32, as in JAX); the loss terms upcast their
    inputs to float32 either way (`losses._f32`)."""
    if compute_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"compute_dtype must be float32 or bfloat16, not {compute_dtype!r}")
    if compute_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def temporal_mean_of(cohort, settings_dict) -> TemporalMean | None:
    """PCL's temporal mean of `cohort` where the settings keep one."""
    decay = settings_dict.get("temporal_mean_decay")
    return TemporalMean(cohort, decay) if decay else None


def train_step(
    cohort,
    optimizer,
    schedule,
    x,
    y,
    settings_dict,
    epoch,
    info,
    device,
    compute_dtype="float32",
    temporal_mean: TemporalMean | None = None,
):
    """One SGD step of the whole cohort on a uint8 NCHW batch (and of PCL's temporal mean);
    returns (total, terms)."""
    with autocast(device, compute_dtype):
        images = normalize(x.to(device), info)
        out = cohort(images)
        if temporal_mean is not None:
            out["mean_branch_logits"] = temporal_mean.branch_logits(images)
        total, terms = mirror(settings_dict["method"]).objective(
            out, y.to(device), settings_dict, epoch, info.num_classes
        )
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    pause_members(cohort, settings_dict, terms)
    optimizer.step()
    schedule.step()
    if temporal_mean is not None:
        temporal_mean.update(cohort)
    return total, terms


def evaluate(
    cohort,
    images,
    labels,
    info,
    device,
    batch_size,
    compute_dtype="float32",
    temporal_mean: TemporalMean | None = None,
    evaluated=pair_evaluated,
) -> dict[str, float]:
    """Top-1 of each model `evaluated` (a mirror's: outputs -> logits by name) names."""
    models = [cohort] + ([temporal_mean.model] if temporal_mean is not None else [])
    for model in models:
        model.eval()
    correct = {}
    with torch.no_grad(), autocast(device, compute_dtype):
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[start : start + batch_size])).permute(0, 3, 1, 2)
            y = torch.from_numpy(np.array(labels[start : start + batch_size])).long().to(device)
            outputs = [model(normalize(x.to(device), info)) for model in models]
            for name, z in evaluated(*outputs).items():
                correct[name] = correct.get(name, 0) + int((z.argmax(-1) == y).sum())
    return {k: v / len(images) for k, v in correct.items()}


def load_jax_initial_weights(cohort, config, method) -> str:
    """Overwrites `cohort`'s weights and BatchNorm statistics with the JAX trainer's initial
    ones for `config.seed` (`ffcl_jax.train.create_cohort`, converted member by member); returns
    their digest (`report.weights_sha256`), which the JAX run of that seed records too."""
    from flax import nnx

    from ffcl_jax import convert
    from ffcl_jax import train as jax_train

    info = datasets.dataset_info(config.dataset)
    jax_cohort = jax_train.create_cohort(config, method, info)
    params, stats = nnx.state(jax_cohort, nnx.Param), nnx.state(jax_cohort, nnx.BatchStat)
    for member in params:
        member_stats = stats[member] if member in stats else {}
        state_dict = convert.to_torch_state_dict(params[member], member_stats)
        getattr(cohort, member).load_state_dict(state_dict, strict=True)
    return report.weights_sha256(jax_cohort)


def jax_batches(config, images, labels, epoch: int, num_views: int = 1, images_per_class: int = 0):
    """The JAX trainer's training batches of `epoch` (`input_pipeline.TrainData`: the same
    order and augmentation draws for the same seed), as uint8 NCHW tensors."""
    data = input_pipeline.TrainData(
        config,
        images,
        labels,
        config.batch_size,
        num_views=num_views,
        images_per_class=images_per_class,
    )
    for batch in data.epoch(epoch):
        yield as_tensors(batch["image"], batch["label"])


def build(config, steps_per_epoch: int, device: str):
    """The cohort, its optimizer and schedule, the loss settings (`settings_mapping`) and the
    dataset info of a config; with `config.reference_from_jax`, the cohort starts from the JAX
    trainer's weights."""
    torch.manual_seed(config.seed)
    method = methods.create(config.method, dict(config.loss), config.get("protocol_rampup_epochs"))
    if method.frozen_members:
        raise ValueError("the reference trains every method but those with a loaded member (kd)")
    info = datasets.dataset_info(config.dataset)
    cohort = mirror(config.method).build(config, method, info).to(device)
    started_from = None
    if config.get("reference_from_jax", False):
        started_from = load_jax_initial_weights(cohort, config, method)
    optimizer, schedule = optim.make_optimizer(cohort, config, steps_per_epoch, method)
    settings = settings_mapping(method) | {"initial_weights_sha256": started_from}
    return cohort, optimizer, schedule, settings, info


def as_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC numpy images (or batch x views x H x W x C) and int labels as a uint8 NCHW
    tensor (batch x views x C x H x W) and an int64 tensor."""
    images_nchw = torch.from_numpy(np.moveaxis(np.asarray(images), -1, images.ndim - 3).copy())
    return images_nchw, torch.from_numpy(np.array(labels)).long()


def train_and_evaluate(config, workdir: str, device: str = "cpu", command: str = "") -> dict:
    """Trains and evaluates as the JAX trainer does; `command` is recorded in `results.json`
    as what made the run."""
    (train_images, train_labels), splits = datasets.load_splits(config)
    eval_split = "validation" if "validation" in splits else "test"
    spe = len(train_images) // config.batch_size
    cohort, optimizer, schedule, settings_dict, info = build(config, spe, device)
    temporal_mean = temporal_mean_of(cohort, settings_dict)
    num_views = settings_dict["num_views"]
    images_per_class = methods.create(
        config.method, dict(config.loss), config.get("protocol_rampup_epochs")
    ).images_per_class(config, info.num_classes)
    workdir = storage.path(workdir)  # local or gs://
    storage.prepare_workdir(workdir)

    def evaluate_split(name: str) -> dict[str, float]:
        images, labels = splits[name]
        batch = config.eval_batch_size
        return evaluate(
            cohort,
            images,
            labels,
            info,
            device,
            batch,
            config.compute_dtype,
            temporal_mean,
            mirror(config.method).evaluated,
        )

    images_nchw, labels_all = as_tensors(train_images, train_labels)
    history, start, step, first_batch = [], time.time(), 0, None
    with (workdir / "metrics.jsonl").open("w") as log:
        for epoch in range(config.num_epochs):
            cohort.train()
            if config.get("reference_from_jax", False):
                batches = jax_batches(
                    config, train_images, train_labels, epoch, num_views, images_per_class
                )
            else:
                batches = epoch_batches(
                    images_nchw, labels_all, config, epoch, spe, num_views, images_per_class
                )
            for x, y in batches:
                if step == 0:
                    first_batch = report.batch_sha256(np.moveaxis(x.numpy(), -3, -1), y.numpy())
                total, terms = train_step(
                    cohort,
                    optimizer,
                    schedule,
                    x,
                    y,
                    settings_dict,
                    epoch,
                    info,
                    device,
                    config.compute_dtype,
                    temporal_mean,
                )
                step += 1
                if step % config.log_every_steps == 0:
                    row = {"kind": "train", "step": step, "epoch": epoch + 1}
                    row.update({k: float(v.detach()) for k, v in terms.items()})
                    row["loss"] = float(total.detach())
                    log.write(json.dumps(row) + "\n")
            if (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == config.num_epochs:
                accuracy = evaluate_split(eval_split)
                row = {"epoch": epoch + 1, "step": step, "split": eval_split, **accuracy}
                history.append(row)
                log.write(json.dumps({"kind": "eval", **row}) + "\n")
                log.flush()
                print(
                    f"epoch {epoch + 1}/{config.num_epochs} {eval_split} top-1: "
                    + " ".join(f"{k} {100 * v:.2f}%" for k, v in accuracy.items()),
                    flush=True,
                )
        final_test = None
        if eval_split != "test" and config.final_test:
            accuracy = evaluate_split("test")
            final_test = {"epoch": config.num_epochs, "step": step, "split": "test", **accuracy}
            log.write(json.dumps({"kind": "eval", **final_test}) + "\n")
    results = {
        "implementation": "pytorch_reference",
        "config": json.loads(config.to_json_best_effort()),
        "wall_seconds": time.time() - start,
        "eval_split": eval_split,
        "history": history,
        "summary": report.summarize(history),
        "final_test": final_test,
        "command": command,
        # The JAX run of this seed records the same digest when this run started from its
        # weights (`reference_from_jax`); None: PyTorch's own initialisation.
        "initial_weights_sha256": settings_dict["initial_weights_sha256"],
        "first_batch_sha256": first_batch,  # the JAX run's, when on its batches
    }
    storage.write_text(workdir / "results.json", json.dumps(results, indent=2))
    print(report.format_table(results["summary"], eval_split, final_test))
    return results


def main() -> None:
    # Flags are defined here, not at import: importing this module (tests do) next to
    # `ffcl_jax.main`, which defines `--config` too, must not clash.
    config = config_flags.DEFINE_config_file("config", "configs/fashion_mnist.py", "Config file.")
    workdir = flags.DEFINE_string("workdir", None, "Output folder (results.json, metrics.jsonl).")
    device = flags.DEFINE_string("device", "cuda" if torch.cuda.is_available() else "cpu", "")

    def run(argv):
        del argv
        if not workdir.value:
            raise app.UsageError("--workdir is required")
        torch.set_num_threads(os.cpu_count() or 1)
        command = " ".join(["python -m ffcl_jax.torch_reference.train", *sys.argv[1:]])
        train_and_evaluate(config.value, workdir.value, device.value, command)

    app.run(run)


if __name__ == "__main__":
    main()
