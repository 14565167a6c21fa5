"""The sections of a study's report (`study.py` writes them from a plan, `study_runs.Phase`):
each section is a small frozen dataclass with `lines(ctx)` (its Markdown lines; the report
joins the sections' non-empty lines with a blank line) and `compute(ctx)` (what it adds to the
report's JSON, `ctx.result`). The sensitivity analyses are in `study_sensitivity.py`.

The selection a final phase reads (`select`, `complete_seeds`) is here too: it is what the
selection table shows.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import statistics

import study_runs
import study_stats


@dataclasses.dataclass
class Context:
    """What a phase's report reads: its rows, the finished runs' records, the seeds."""

    rows: list  # [(Run, seeds)]
    records: list[dict]
    seeds: list[int]  # the phase's seeds
    extra: list[str]  # the config overrides of every run
    output: str  # <output>.json, <output>_runs/
    selection: dict | None = None  # the selection a final phase's rows come from
    result: dict = dataclasses.field(default_factory=dict)  # the report's JSON

    @property
    def planned(self) -> int:
        return sum(len(seeds) for _, seeds in self.rows)

    @property
    def complete(self) -> bool:
        """Every planned run has finished (a progress report carries no test before)."""
        return len(self.records) == self.planned

    @property
    def validation_size(self) -> int | None:
        sizes = [o.split("=", 1)[1] for o in self.extra if o.startswith("validation_size=")]
        return int(sizes[-1]) if sizes else None

    def of(self, name: str, framework: str = "jax") -> list[dict]:
        return study_runs.runs_of(self.records, name, framework)


class Section:
    def compute(self, ctx: Context) -> None:
        """Adds this section's part of the JSON to `ctx.result` (most add nothing)."""

    def lines(self, ctx: Context) -> list[str]:
        raise NotImplementedError


def render(sections, ctx: Context) -> list[str]:
    """Every section computed first (in order), then their lines, blank-line separated."""
    for section in sections:
        section.compute(ctx)
    lines: list[str] = []
    for section in sections:
        mine = section.lines(ctx)
        if mine:
            lines += ([""] if lines else []) + mine
    return lines


def per_seed(records: list[dict], method: str, framework: str, model: str) -> dict[int, float]:
    """{seed: last-epoch test top-1 in points} of one row's runs."""
    return {
        r["seed"]: 100 * r["summary"][model]["last"]
        for r in records
        if r["method"] == method and r["framework"] == framework and model in r["summary"]
    }


# ------------------------------------------------------------------------------ plain tables


@dataclasses.dataclass(frozen=True)
class Text(Section):
    """Fixed lines; `{validation_size}` is replaced by the phase's."""

    text: tuple[str, ...]

    def lines(self, ctx):
        return [line.replace("{validation_size}", str(ctx.validation_size)) for line in self.text]


@dataclasses.dataclass(frozen=True)
class Progress(Section):
    """How many runs are in and their wall time; until all are, a progress report's caveat."""

    def lines(self, ctx):
        n, seeds = len(ctx.records), len(ctx.seeds)
        progress = (
            f"All {n} runs ({seeds} seeds) are in: the protocol's analysis."
            if ctx.complete
            else f"Progress: {n} of {ctx.planned} runs ({seeds} seeds). Until every seed is in, "
            "this is a progress report: mean differences only, no interval and no test (the "
            "protocol tests once, on every seed)."
        )
        hours = sum(r["wall_seconds"] or 0.0 for r in ctx.records) / 3600
        return [f"{progress} Wall time of the finished runs: {hours:.1f} h."]


@dataclasses.dataclass(frozen=True)
class RowsTable(Section):
    """One line per row: its leading `cells`, each model's last-epoch test top-1 (mean ± std
    over its finished seeds), the wall time per run (`wall_average`) with the CPU ISA."""

    header: tuple[str, ...]
    models: tuple[str, ...]
    # leading cells, of: name, code_name (in backticks), description, framework, runs (how
    # many finished), done_of_seeds ("3/5")
    cells: tuple[str, ...] = ("name", "description", "framework", "done_of_seeds")
    missing: str = "n/a"  # a model a row's finished runs do not have
    pending: str = "pending"  # a row with no finished run
    wall_average: str = "mean"  # or "median": a run that shared the machine pulls a mean up
    # (record field, format spec): the median over the row's runs of a value each run records
    # (a phase's `record_fields` names it, e.g. "results.train_flops_per_step"), before the wall
    medians: tuple[tuple[str, str], ...] = ()

    def lines(self, ctx):
        lines = ["| " + " | ".join(self.header) + " |", "|---" * len(self.header) + "|"]
        average = statistics.median if self.wall_average == "median" else statistics.fmean
        for run, seeds in ctx.rows:
            mine = ctx.of(run.name, run.framework)
            leading = {
                "name": run.name,
                "code_name": f"`{run.name}`",
                "description": run.description,
                "framework": run.framework,
                "runs": str(len(mine)),
                "done_of_seeds": f"{len(mine)}/{len(seeds)}",
            }
            cells = [leading[c] for c in self.cells]
            for model in self.models:
                values = [r["summary"][model]["last"] for r in mine if model in r["summary"]]
                cells.append(
                    study_stats.mean_std(values)
                    if values
                    else self.missing
                    if mine
                    else self.pending
                )
            for key, spec in self.medians:
                values = [r[key] for r in mine if r.get(key) is not None]
                cells.append(format(statistics.median(values), spec) if values else self.missing)
            walls = [r["wall_seconds"] for r in mine if r["wall_seconds"]]
            machines = [r["machine"] for r in mine]
            cells.append(study_runs.wall_cell(walls, machines, average=average))
            lines.append("| " + " | ".join(cells) + " |")
        return lines


# ------------------------------------------------------------------------------ selection


def validation_accuracy(results: dict, model: str = "student") -> float:
    """Last-epoch validation top-1 of `model`: the only number selection reads. A run whose
    epochs were evaluated on the test split is refused, so test accuracy cannot leak in."""
    history = results["history"]
    if results.get("eval_split") != "validation" or any(
        row.get("split") != "validation" for row in history
    ):
        raise ValueError("a selection run must evaluate its epochs on the validation split")
    return history[-1][model]


def method_of(run: study_runs.Run) -> str:
    return run.overrides[0].removeprefix("method=")


def complete_seeds(records: list[dict], grid) -> list[int]:
    """The seeds every configuration of `grid` has finished: what the final selection uses,
    so that no configuration is judged on a seed another lacks."""
    seeds = {r["seed"] for r in records}
    return sorted(
        s
        for s in seeds
        if all(any(r["run"] == run.name and r["seed"] == s for r in records) for run in grid)
    )


def select(records: list[dict], grid, seeds: list[int] | None = None) -> dict[str, dict]:
    """Per method, the configuration of `grid` with the best mean validation top-1 of the
    student over `seeds` (None: each configuration's finished seeds; ties: the earlier one)."""
    best: dict[str, dict] = {}
    for run in grid:
        mine = [
            r for r in records if r["run"] == run.name and (seeds is None or r["seed"] in seeds)
        ]
        if not mine:
            continue
        score = statistics.fmean(validation_accuracy(r["results"]) for r in mine)
        method = method_of(run)
        if method not in best or score > best[method]["validation_student"]:
            best[method] = {
                "run": run.name,
                "overrides": list(run.overrides),
                "validation_student": score,
                "seeds": sorted(r["seed"] for r in mine),
            }
    return best


@dataclasses.dataclass(frozen=True)
class SelectionTable(Section):
    """Each configuration's last-epoch validation top-1 per model (mean, and each seed's), the
    selected one of each method in bold; the JSON's grid and selection."""

    models: tuple[str, ...]

    def compute(self, ctx):
        ctx.result["validation_size"] = ctx.validation_size
        ctx.result["grid"] = [{"run": r.name, "overrides": list(r.overrides)} for r, _ in ctx.rows]
        ctx.result["selected"] = select(ctx.records, [run for run, _ in ctx.rows])

    def lines(self, ctx):
        header = ["configuration", "what", "seeds", *self.models, "wall / run"]
        lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        selected = {s["run"] for s in ctx.result["selected"].values()}
        for run, _ in ctx.rows:
            mine = [r for r in ctx.records if r["run"] == run.name]
            cells = [run.name, run.description, f"{len(mine)}/{len(ctx.seeds)}"]
            for model in self.models:
                values = [validation_accuracy(r["results"], model) for r in mine]
                if not values:
                    cells.append("pending")
                    continue
                each = ", ".join(f"{100 * v:.2f}" for v in values)
                cells.append(f"{100 * statistics.fmean(values):.2f} ({each})")
            walls = [r["wall_seconds"] for r in mine if r["wall_seconds"]]
            cells.append(study_runs.wall_cell(walls, [r["machine"] for r in mine]))
            if run.name in selected:
                cells[0] = f"**{cells[0]}**"
            lines.append("| " + " | ".join(cells) + " |")
        return lines


# ------------------------------------------------------------------- differences, paired or not


@dataclasses.dataclass(frozen=True)
class Paired:
    """`mine` minus `theirs` (student, points), paired by seed, 95% t-interval; within
    `framework`; `seeds_of` (name, framework): only the seeds that row finished."""

    mine: str
    theirs: str
    framework: str = "jax"
    seeds_of: tuple[str, str] | None = None
    label: str | None = None

    def row(self, ctx) -> str:
        mine, theirs = ctx.of(self.mine, self.framework), ctx.of(self.theirs, self.framework)
        if self.seeds_of is not None:
            kept = {r["seed"] for r in ctx.of(*self.seeds_of)}
            mine, theirs = ([r for r in x if r["seed"] in kept] for x in (mine, theirs))
        label = self.label or f"{self.mine} - {self.theirs} (paired by seed)"
        return study_stats.difference_row(label, study_stats.paired_difference(mine, theirs))


@dataclasses.dataclass(frozen=True)
class Ablations:
    """Each ablation row minus `reference`, paired by seed."""

    reference: str

    def rows(self, ctx) -> list[str]:
        return [Paired(run.name, self.reference).row(ctx) for run, _ in ctx.rows if run.ablation]


@dataclasses.dataclass(frozen=True)
class Welch:
    """PyTorch minus JAX of one row's student, unpaired (different draws for a seed)."""

    name: str

    def row(self, ctx) -> str:
        def students(framework):
            return [r["summary"]["student"]["last"] for r in ctx.of(self.name, framework)]

        diff = study_stats.framework_difference(students("pytorch"), students("jax"))
        return study_stats.difference_row(f"{self.name}: pytorch - jax (unpaired, Welch)", diff)


@dataclasses.dataclass(frozen=True)
class DifferenceTable(Section):
    """`| comparison | student difference |`, one row per item (`Paired`, `Ablations`,
    `Welch`); **bold** where the interval excludes 0."""

    items: tuple

    def lines(self, ctx):
        lines = ["| comparison | student difference |", "|---|---|"]
        for item in self.items:
            lines += item.rows(ctx) if isinstance(item, Ablations) else [item.row(ctx)]
        return lines


@dataclasses.dataclass(frozen=True)
class SummaryTable(Section):
    """The JAX methods' students and `reference` minus each of `against` (paired): the
    summary a README shows, the same cells as the phase's tables."""

    reference: str
    against: tuple[str, ...]
    header: str = "| method | student test top-1 (%) | FFCL minus it, 95% interval |"

    def lines(self, ctx):
        cells = {
            b: study_stats.format_difference(
                study_stats.paired_difference(ctx.of(self.reference), ctx.of(b)), None
            )
            for b in self.against
        }
        lines = [self.header, "|---|---|---|"]
        for run, seeds in ctx.rows:
            if run.ablation or run.framework != "jax":
                continue
            values = [r["summary"]["student"]["last"] for r in ctx.of(run.name)]
            cell = f"{study_stats.mean_std(values)} ({len(values)}/{len(seeds)} seeds)"
            lines.append(
                f"| {run.name} ({run.description}) | {cell} | {cells.get(run.name, '-')} |"
            )
        return lines


# ------------------------------------------------------ primary comparisons, Holm, the rule


def cell(c: dict) -> str:
    """A comparison's cell: mean [95% CI] (n, p, Holm p); a progress report's mean only."""
    if "mean" not in c:
        return f"pending (n={c['n']})"
    if "p" not in c:
        return f"{c['mean']:+.2f} (n={c['n']}; interim mean, no interval or test)"
    low, high = c["ci95"]
    adjusted = f", Holm p = {c['p_holm']:.3g}" if "p_holm" in c else ""
    return f"{c['mean']:+.2f} [{low:+.2f}, {high:+.2f}] (n={c['n']}, p = {c['p']:.3g}{adjusted})"


SPREAD = ("sd of the differences", lambda c: f"{c['sd']:.2f}")


def rule_columns(ahead_label: str) -> tuple:
    """The extra columns of comparisons read by the rule: spread, seeds ahead, reading."""
    return (
        SPREAD,
        (ahead_label, lambda c: f"{c['ahead']} of {c['n']}"),
        ("reading", lambda c: f"**{c['reading']}**"),
    )


def comparison_lines(compared: dict, first_column: str, second_column: str, extra) -> list[str]:
    """A table of comparisons, one row each; the `extra` (header, cell) columns only once every
    comparison is tested (progress reports carry no test)."""
    if not all("sd" in c for c in compared.values()):
        extra = ()
    headers = [first_column, second_column, *(header for header, _ in extra)]
    lines = ["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
    for name, c in compared.items():
        lines.append("| " + " | ".join([f"`{name}`", cell(c), *(f(c) for _, f in extra)]) + " |")
    return lines


@dataclasses.dataclass(frozen=True)
class Comparisons(Section):
    """The primary comparisons: `reference`'s student minus each other JAX row's, paired by
    seed, t-test, Holm over them all, the rule's reading; and PyTorch minus JAX for each
    PyTorch row (paired by seed: it starts from the JAX run's weights and batches). Tested
    only once every run is in (`ctx.complete`); before, mean differences only."""

    reference: str = "ffcl"
    model: str = "student"
    label: str = "FFCL's student minus"
    ahead_label: str = "seeds FFCL ahead"
    frameworks_label: str = "PyTorch minus JAX, student, from the same start"

    def compute_for(self, rows, records: list[dict], test: bool) -> dict:
        def of(name, framework):
            return per_seed(records, name, framework, self.model)

        ref = of(self.reference, "jax")
        primary = {
            run.name: study_stats.paired(ref, of(run.name, "jax"), test)
            for run, _ in rows
            if run.framework == "jax" and run.name != self.reference and not run.ablation
        }
        study_stats.read_with_holm(primary)
        frameworks = {
            run.name: study_stats.paired(of(run.name, "pytorch"), of(run.name, "jax"), test)
            for run, _ in rows
            if run.framework == "pytorch"
        }
        return {"primary": primary, "pytorch_minus_jax": frameworks}

    def compute(self, ctx):
        ctx.result["comparisons"] = self.compute_for(ctx.rows, ctx.records, ctx.complete)

    def primary_lines(self, primary: dict, first_column: str) -> list[str]:
        second = "paired difference, points [95% CI]"
        return comparison_lines(primary, first_column, second, rule_columns(self.ahead_label))

    def lines(self, ctx):
        compared = ctx.result["comparisons"]
        frameworks = comparison_lines(
            compared["pytorch_minus_jax"], self.frameworks_label, "points [95% CI]", (SPREAD,)
        )
        return [*self.primary_lines(compared["primary"], self.label), "", *frameworks]


# ------------------------------------------------------------------- curves, code, commands


@dataclasses.dataclass(frozen=True)
class StudentCurves(Section):
    """The student's top-1 per epoch, mean over seeds, one line a row: `<output>_student.png`."""

    def compute(self, ctx):
        if ctx.records:
            runs = tuple(run for run, _ in ctx.rows)
            study_runs.plot_students(ctx.records, ctx.output + "_student.png", runs)

    def lines(self, ctx):
        if not ctx.records:
            return []
        curves = os.path.basename(ctx.output) + "_student.png"
        return [f"Student test top-1 per epoch, mean over seeds: `{curves}`."]


@dataclasses.dataclass(frozen=True)
class CodeLine(Section):
    """Which commit's code the finished runs ran (each run's `table_run.json`)."""

    def lines(self, ctx):
        if not ctx.records:
            return []
        counts = collections.Counter(r["commit"] or "unrecorded" for r in ctx.records)
        if len(counts) == 1:
            return [f"Code: every finished run ran commit `{next(iter(counts))}`."]
        runs = ", ".join(f"`{c}` ({n} run{'s' * (n > 1)})" for c, n in counts.items())
        return [f"Code: the finished runs ran more than one commit: {runs}."]


def seed_ranges(seeds: list[int]) -> str:
    """[1000, 1001, 1002, 1005] -> '1000-1002, 1005'."""
    spans: list[list[int]] = []
    for seed in sorted(seeds):
        if spans and seed == spans[-1][1] + 1:
            spans[-1][1] = seed
        else:
            spans.append([seed, seed])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


@dataclasses.dataclass(frozen=True)
class Commands(Section):
    """Each finished run's recorded command. `grouped`: once per distinct command with
    `{seed}` for its seed and the seeds that ran it (hundreds of commands would bury the
    table; a run whose command differs in anything but the seed still gets a line)."""

    header: str = "Commands:"
    grouped: bool = False
    always: bool = True  # the header even before any run has finished

    def lines(self, ctx):
        if not ctx.records and not self.always:
            return []
        if not self.grouped:
            return [self.header, "", *(f"- `{r['command']}`" for r in ctx.records)]
        seeds_of: dict[str, list[int]] = {}
        for r in ctx.records:
            pattern = re.sub(rf"(seed=?){r['seed']}\b", r"\1{seed}", r["command"])
            seeds_of.setdefault(pattern, []).append(r["seed"])
        commands = [f"- seeds {seed_ranges(s)}: `{c}`" for c, s in seeds_of.items()]
        return [self.header, "", *commands]
