"""docs/adding_a_method.md works as written: its method module and its PyTorch mirror, taken
from the page's code blocks and registered, train three float64 steps that agree to 1e-12."""

from __future__ import annotations

import os
import re
import sys
import types

import jax
import numpy as np
import pytest
import torch

from ffcl_jax import convert, datasets, input_pipeline, methods, train
from ffcl_jax.torch_reference import methods as mirrors
from ffcl_jax.torch_reference import optim as torch_optim
from tests.conftest import REPO, tiny_config

PAGE = os.path.join(REPO, "docs", "adding_a_method.md")


def page_module(path: str, monkeypatch) -> types.ModuleType:
    """The page's python code block whose first line is `# <path>`, as the module at `path`."""
    blocks = re.findall(r"```python\n(.*?)```", open(PAGE).read(), flags=re.S)
    (source,) = [b for b in blocks if b.startswith(f"# {path}\n")]
    module = types.ModuleType(path.replace("/", ".").removesuffix(".py"))
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look it up
    exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102 - the repo's own page
    return module


@pytest.fixture
def dkd(monkeypatch):
    method = page_module("ffcl_jax/methods/dkd.py", monkeypatch)
    mirror = page_module("ffcl_jax/torch_reference/dkd.py", monkeypatch)
    monkeypatch.setitem(methods.REGISTRY, "dkd", method.DKD)
    monkeypatch.setitem(
        mirrors.MIRRORS, "dkd", mirrors.Mirror(mirrors.two_networks, mirror.objective)
    )
    return method, mirror


def test_the_page_lists_what_it_registers():
    text = open(PAGE).read()
    assert '"dkd": DKD' in text and '"dkd": Mirror(two_networks, dkd.objective)' in text


@pytest.mark.slow
def test_the_pages_method_trains_as_its_mirror(dkd, fmnist_dir):
    with jax.enable_x64(True):
        config = tiny_config(fmnist_dir, method="dkd", teacher="resnet14", compute_dtype="float64")
        config.loss.tau, config.loss.beta = 2.0, 4.0
        method = train.check_config(config, 1)
        assert (method.settings.alpha, method.settings.beta, method.settings.tau) == (1, 4, 2)
        setup, state = train.build(config, method, steps_per_epoch=2)
        assert setup.loss_terms == ("ce_teacher", "ce_student", "dkd")
        info = datasets.dataset_info(config.dataset)
        cohort = mirrors.mirror("dkd").build(config, method, info)
        for member in state.params:
            stats = state.batch_stats[member] if member in state.batch_stats else {}
            weights = convert.to_torch_state_dict(state.params[member], stats)
            getattr(cohort, member).load_state_dict(weights, strict=True)
        cohort = cohort.double()
        optimizer, schedule = torch_optim.make_optimizer(cohort, config, 2, method)
        settings = mirrors.settings_mapping(method)
        rng = np.random.default_rng(3)
        images = rng.integers(0, 256, (96, 28, 28, 1)).astype(np.uint8)
        labels = rng.integers(0, 10, 96).astype(np.int32)
        step = jax.jit(setup.train_step)
        for i in range(3):
            batch = {"image": images[32 * i : 32 * (i + 1)], "label": labels[32 * i : 32 * (i + 1)]}
            state, metrics = step(state, batch)
            x = np.moveaxis(np.asarray(input_pipeline.normalize(batch["image"], info)), -1, 1)
            cohort.train()
            optimizer.zero_grad()
            total, terms = mirrors.mirror("dkd").objective(
                cohort(torch.from_numpy(np.array(x)).double()),
                torch.from_numpy(batch["label"]).long(),
                settings,
                i // 2,
                10,
            )
            total.backward()
            optimizer.step()
            schedule.step()
            assert float(metrics["dkd"]) > 0
            assert float(metrics["dkd"]) == pytest.approx(float(terms["dkd"].detach()), rel=1e-12)
            assert float(metrics["loss"]) == pytest.approx(float(total.detach()), rel=1e-12)
        for member in state.params:
            stats = state.batch_stats[member] if member in state.batch_stats else {}
            ours = convert.to_torch_state_dict(state.params[member], stats, as_numpy=True)
            for name, value in getattr(cohort, member).state_dict().items():
                if name.endswith(("running_var", "num_batches_tracked")):
                    continue  # Flax averages the biased variance, PyTorch the unbiased one
                np.testing.assert_allclose(ours[name], value.numpy(), atol=1e-12, rtol=0)


def test_the_pages_settings_are_validated(dkd):
    from ffcl_jax.errors import UserError

    with pytest.raises(UserError, match="loss.alpha and loss.beta must be >= 0"):
        methods.create("dkd", {"beta": -1.0})
    with pytest.raises(UserError, match="method 'dkd' has no setting loss.lam_feat"):
        methods.create("dkd", {"lam_feat": 1.0})
