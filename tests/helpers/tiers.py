"""The cases of a parametrized test that the fast tier keeps (`bash scripts/test.sh`); the full
tier (`bash scripts/test.sh --all`, CI) runs every case."""

from __future__ import annotations

import pytest

# One network of each family of the zoo: the CIFAR ResNet, its four-times-wider form, the WRN.
FAST_ZOO = ("resnet8", "resnet8x4", "wrn_16_2")


def cases(values, fast, ids=None) -> list:
    """A `pytest.param` of each of `values`, with its id (`ids`, or the value itself), marked slow
    unless that id is in `fast`."""
    values = list(values)
    ids = [str(v) for v in values] if ids is None else list(ids)
    unknown = set(fast) - set(ids)
    assert not unknown, f"fast cases {unknown} are not among {ids}"
    return [
        pytest.param(value, id=name, marks=() if name in fast else pytest.mark.slow)
        for value, name in zip(values, ids, strict=True)
    ]
