"""Every preset's fingerprint (tests/helpers/fingerprints.py) equals the committed record: the
loss terms of three float64 train steps to 1e-12, the evaluated models and their logits, the
export's keys and parameter count, the checkpoint's tree. A refactoring that changes a number
fails here; a change meant to move one re-records (scripts/fingerprint.py --record) in a commit
of its own."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import REPO
from tests.helpers import fingerprints

RECORD = os.path.join(REPO, "tests", "data", "fingerprints.json")


@pytest.fixture(scope="module")
def record():
    with open(RECORD) as f:
        return json.load(f)


def test_every_case_is_recorded(record):
    assert sorted(record) == sorted(fingerprints.CASES)


# The full tier; the fast tier keeps the comparison itself (below).
@pytest.mark.slow
@pytest.mark.parametrize("name", fingerprints.CASES)
def test_fingerprint_unchanged(name, record):
    problems = fingerprints.compare(record[name], fingerprints.compute(name))
    assert not problems, "\n".join(problems)


def test_compare_reports_a_moved_term(record):
    moved = json.loads(json.dumps(record["ffcl"]))
    moved["terms"]["loss"][1] *= 1 + 1e-9
    moved["checkpoint_tree"] = moved["checkpoint_tree"][1:]
    problems = fingerprints.compare(record["ffcl"], moved)
    assert any(p.startswith("term loss") for p in problems)
    assert "checkpoint_tree changed" in problems
