"""A study's plan: what `study.py` runs and reports, one small module per study under
`experiments/plans/` whose `get_plan()` returns a `Plan`.

A plan has a final phase and, where the study selects settings first, a selection phase. Each
phase names its rows (a `study_runs.Run` with its seeds, or the phase's seeds), where their
workdirs, results and report go, and the report's sections (`study_report`,
`study_sensitivity`): tables of mean ± std, paired differences, the primary comparisons with
Holm, sensitivity analyses, the commands. Everything a study has that another lacks is a field
of its plan or a section it lists, not code in the driver.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Callable

from study_runs import Run  # noqa: F401  (plans build their rows from it)

from ffcl_jax.errors import UserError

Rows = tuple  # ((Run, seeds or None), ...): None takes the phase's seeds


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a study: its runs and the report written from them."""

    name: str  # "select" or "final", what --phase picks
    # ((Run, seeds or None), ...), or for a final phase after a selection, a function of the
    # selection ({"seeds": [...], method: {"run", "overrides", ...}}) that returns them
    rows: Rows | Callable[[dict], Rows]
    seeds: tuple[int, ...]  # a row's seeds where it names none; --seeds replaces them
    root: str  # the runs' workdirs: under --workdirs (or absolute; local or gs://)
    output: str  # under --repo (or absolute): <output>.json and the committed <output>_runs/
    study_file: str  # under --repo (or absolute): the Markdown file with the report's block
    block: str  # the report goes between `<!-- block:start -->` and `<!-- block:end -->`
    sections: tuple = ()  # the report's sections, in order (each `lines(ctx)`, blank-separated)
    # the fields of each run's record, in the JSON's order: `study.RECORD_FIELDS`, or
    # "results.KEY" for any key of the run's results.json
    record_fields: tuple[str, ...] = ("run", "method", "framework", "seed", "command")
    record_order: str = "seed"  # "seed": every row of a seed first; "row": every seed of a row
    json_omit: tuple[str, ...] = ()  # record fields the report reads but the JSON leaves out
    json_fixed: tuple[tuple[str, object], ...] = ()  # constant entries of the JSON
    json_keys: tuple[str, ...] = ("runs",)  # the JSON's top-level keys, in order (if present)
    extra: tuple[str, ...] = ()  # config overrides of every run of the phase (--extra adds)
    # (run, seed) pairs -> the order they run in; None: seed by seed, each seed's rows in order
    run_order: Callable[[list], list] | None = None
    summary_block: str | None = None  # with --summary_file: that file's block gets...
    summary: object | None = None  # ...this section's lines


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    config: str  # the runs' --config
    final: Phase
    select: Phase | None = None  # the selection phase, if the study selects settings first

    def phases(self) -> tuple[Phase, ...]:
        return tuple(p for p in (self.select, self.final) if p is not None)


def load(path: str) -> Plan:
    """The plan that the module at `path` returns from `get_plan()`."""
    if not os.path.isfile(path):
        raise UserError(f"no plan file {path}: name one of experiments/plans/*.py")
    name = "study_plan_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_plan"):
        raise UserError(f"{path} has no get_plan(): a plan module returns its Plan from it")
    plan = module.get_plan()
    if not isinstance(plan, Plan):
        raise UserError(f"{path}: get_plan() must return a study_plan.Plan, not {type(plan)}")
    return plan
