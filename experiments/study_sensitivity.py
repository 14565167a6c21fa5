"""Sensitivity analyses of a study's primary comparisons (`study_report.Comparisons`), as report
sections: the seeds that ran on one machine kind (`OneMachine`), and once every run is in
(`Sensitivity`) Wilcoxon's signed-rank test with Holm, leave-one-seed-out, outlier rules with
the resumed runs named, a secondary family of comparisons, each method's parameters and its
logged ramp-up weights. Each reads the comparisons by the registered rule after one change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics

import scipy.stats
import study_stats
from study_report import Comparisons, Section, cell, comparison_lines, per_seed, rule_columns


def one_machine_seeds(records: list[dict]) -> tuple[str | None, list[int]]:
    """The seeds whose runs all ran on one machine kind (a project's kind can change between
    sessions, and XLA:CPU's rounding with it): the most common such kind and its seeds."""
    kinds: dict[int, set] = {}
    for r in records:
        kinds.setdefault(r["seed"], set()).add(r["machine"])
    single = sorted(next(iter(k)) for k in kinds.values() if len(k) == 1 and None not in k)
    if not single:
        return None, []
    kind = max(single, key=single.count)
    return kind, sorted(seed for seed, k in kinds.items() if k == {kind})


@dataclasses.dataclass(frozen=True)
class OneMachine(Section):
    """The comparisons again on the seeds whose runs all ran on the most common machine kind."""

    comparisons: Comparisons
    primary_label: str = "FFCL's student minus, one kind"
    frameworks_label: str = "PyTorch minus JAX, one kind"

    def compute(self, ctx):
        kind, seeds = one_machine_seeds(ctx.records)
        kept = [r for r in ctx.records if r["seed"] in seeds]
        ctx.result["one_machine"] = {
            "machine": kind,
            "seeds": seeds,
            "comparisons": self.comparisons.compute_for(ctx.rows, kept, ctx.complete),
        }

    def lines(self, ctx):
        one_machine = ctx.result["one_machine"]
        kind, kept = one_machine["machine"], one_machine["seeds"]
        if kind is None:
            return ["Sensitivity to the machine kind: no seed has all its runs on one machine yet."]
        if len(kept) == len({r["seed"] for r in ctx.records}):
            return [
                f"Sensitivity to the machine kind: every seed's runs ran on one kind, {kind}; "
                "the analysis above is the one-kind analysis."
            ]
        compared = one_machine["comparisons"]
        return [
            f"Sensitivity to the machine kind: the {len(kept)} of {len(ctx.seeds)} seeds whose "
            f"runs all ran on one kind, {kind} (seeds {', '.join(map(str, kept))}):",
            "",
            *self.comparisons.primary_lines(compared["primary"], self.primary_label),
            "",
            *comparison_lines(
                compared["pytorch_minus_jax"],
                self.frameworks_label,
                "points [95% CI]",
                (("sd of the differences", lambda c: f"{c['sd']:.2f}"),),
            ),
        ]


def wilcoxon_readings(primary: dict) -> dict:
    """Wilcoxon's signed-rank test in place of the t-test, Holm over the family, the rule's
    reading (its sign: the mean difference's). The differences are rounded to 1e-6 points
    (test top-1 moves in steps of 0.01) so that equal ones tie and zero ones are zero; scipy's
    defaults: zeros dropped (`zero_method="wilcox"`), two-sided, exact where no difference ties
    or is zero (n <= 50), else the normal approximation with its tie correction (`exact`
    says which); p 1 where every difference is zero."""
    out = {}
    for name, c in primary.items():
        diffs = [round(d, 6) for d in c["differences"]]
        nonzero = [abs(d) for d in diffs if d != 0]
        # every difference zero: no signed rank to test, p 1 (scipy's would be nan)
        result = (
            scipy.stats.wilcoxon(diffs) if nonzero else argparse.Namespace(statistic=0, pvalue=1)
        )
        out[name] = {
            "n": len(diffs),
            "mean": c["mean"],
            "median": statistics.median(diffs),
            "zeros": len(diffs) - len(nonzero),
            "exact": len(nonzero) == len(diffs) == len(set(nonzero)) and len(diffs) <= 50,
            "statistic": float(result.statistic),
            "p": float(result.pvalue),
        }
    return study_stats.read_with_holm(out)


def leave_one_seed_out(comparisons: Comparisons, rows, records: list[dict], primary: dict):
    """For each seed, the comparisons again without it (t-test, Holm, the rule): per
    comparison, the seeds whose removal changes its reading, with the reading, mean and Holm p
    then."""
    seeds = sorted({seed for c in primary.values() for seed in c["seeds"]})
    out = {name: {"seeds": len(seeds), "changes": []} for name in primary}
    for seed in seeds:
        kept = [r for r in records if r["seed"] != seed]
        without = comparisons.compute_for(rows, kept, test=True)["primary"]
        for name, c in without.items():
            if c.get("reading") != primary[name]["reading"]:
                change = {"seed": seed, "reading": c.get("reading"), "mean": c["mean"]}
                out[name]["changes"].append({**change, "p_holm": c.get("p_holm")})
    return out


def resumed_runs(records: list[dict]) -> dict[str, list[int]]:
    """{run: the steps it resumed at} of the runs that resumed from a checkpoint (each run's
    `results.json`, `resumed_at_steps`)."""
    return {r["run"]: r["resumed_at_steps"] for r in records if r.get("resumed_at_steps")}


def _z_scores(values: dict[int, float]) -> dict[int, float]:
    """{seed: (value - mean) / sd} over `values` (sample sd; all 0 where the values are equal)."""
    mean = statistics.fmean(values.values())
    sd = statistics.stdev(values.values()) if len(values) > 1 else 0.0
    return {seed: (v - mean) / sd if sd > 0 else 0.0 for seed, v in values.items()}


def without_outliers(
    records: list[dict], primary: dict, rule: str, reference: str = "ffcl", z_max: float = 3.0
) -> dict:
    """Each comparison without its outlier seeds, t-tested again, Holm, the rule. Two rules
    for an outlier seed, both |z| > `z_max` with the mean and sample sd of all seeds:
    `rule="difference"`, the comparison's paired difference; `rule="run"`, the student of
    either of its two runs among that method's students (one odd run drops its seed from the
    comparison). Each outlier names its difference, the z that flagged it and which of the two
    runs resumed from a checkpoint."""
    resumed = resumed_runs(records)
    ref = per_seed(records, reference, "jax", "student")
    out = {}
    for name, c in primary.items():
        theirs = per_seed(records, name, "jax", "student")
        if rule == "difference":
            flagged = {
                "difference": _z_scores(dict(zip(c["seeds"], c["differences"], strict=True)))
            }
        else:
            flagged = {reference: _z_scores(ref), name: _z_scores(theirs)}
        outliers = []
        for seed in c["seeds"]:
            z = {what: zs[seed] for what, zs in flagged.items() if abs(zs[seed]) > z_max}
            if z:
                runs = (f"jax_{reference}_seed{seed}", f"jax_{name}_seed{seed}")
                outliers.append(
                    {
                        "seed": seed,
                        "difference": ref[seed] - theirs[seed],
                        "z": z,
                        "resumed": [run for run in runs if run in resumed],
                    }
                )
        dropped = {o["seed"] for o in outliers}
        kept = [seed for seed in c["seeds"] if seed not in dropped]
        again = study_stats.paired({s: ref[s] for s in kept}, {s: theirs[s] for s in kept})
        out[name] = {**again, "outliers": outliers}
    return study_stats.read_with_holm(out)


def parameters(records: list[dict]) -> dict[str, dict]:
    """{method: its networks' trainable parameters by part} (`num_params` of its first JAX
    run; a method's runs share the architecture)."""
    out: dict[str, dict] = {}
    for r in records:
        if r["framework"] == "jax" and r.get("num_params"):
            out.setdefault(r["method"], r["num_params"])
    return out


def logged_rampup(records: list[dict], output: str) -> dict:
    """{method: {epoch: the distinct `rampup_weight` values its JAX runs logged}}: the weight
    each method's loss put on its ramped terms, epoch by epoch, as the runs ran (each run's
    committed `metrics.jsonl`; a method that logs none is absent)."""
    out: dict[str, dict[int, set]] = {}
    for r in records:
        if r["framework"] != "jax":
            continue
        path = os.path.join(f"{output}_runs", r["run"], "metrics.jsonl")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if row.get("kind") == "train" and "rampup_weight" in row:
                    weights = out.setdefault(r["method"], {}).setdefault(row["epoch"], set())
                    weights.add(round(row["rampup_weight"], 6))
    return {m: {e: sorted(w) for e, w in sorted(by.items())} for m, by in out.items()}


@dataclasses.dataclass(frozen=True)
class Secondary:
    """A second family, not the claim: `reference`'s student minus each of `against`, paired,
    t-test, Holm over these, the rule read for `reference`; `key` names it in the JSON."""

    reference: str
    against: tuple[str, ...]
    key: str
    text: str  # the paragraph above its table
    label: str  # its first column
    ahead_label: str


@dataclasses.dataclass(frozen=True)
class Sensitivity(Section):
    """The analyses of the complete study (the JSON's `sensitivity`); nothing before."""

    comparisons: Comparisons
    text: str  # the paragraph that introduces them
    outlier_z: float = 3.0  # an outlier: over this many sds (all seeds') from the mean
    outlier_rules: tuple[str, ...] = ("difference", "run")
    secondary: Secondary | None = None
    parameters_text: str | None = None  # None: no parameter table
    rampup_text: str | None = None  # None: no table of logged ramp-up weights

    def compute(self, ctx):
        if not ctx.complete:
            return
        records, primary = ctx.records, ctx.result["comparisons"]["primary"]
        ref = self.comparisons.reference
        out = {
            "wilcoxon": wilcoxon_readings(primary),
            "leave_one_seed_out": leave_one_seed_out(self.comparisons, ctx.rows, records, primary),
            "outlier_z": self.outlier_z,
            "without_outliers": {
                rule: without_outliers(records, primary, rule, ref, self.outlier_z)
                for rule in self.outlier_rules
            },
            "resumed_runs": resumed_runs(records),
        }
        if self.secondary is not None:
            mine = per_seed(records, self.secondary.reference, "jax", "student")
            compared = {
                name: study_stats.paired(mine, per_seed(records, name, "jax", "student"))
                for name in self.secondary.against
            }
            out[self.secondary.key] = study_stats.read_with_holm(compared)
        if self.parameters_text is not None:
            out["parameters"] = parameters(records)
        if self.rampup_text is not None:
            out["logged_rampup_weight"] = logged_rampup(records, ctx.output)
        ctx.result["sensitivity"] = out

    def lines(self, ctx):
        if "sensitivity" not in ctx.result:
            return []
        sens, primary = ctx.result["sensitivity"], ctx.result["comparisons"]["primary"]
        header = f"| {self.comparisons.label} | registered reading (t-test, Holm) |"
        lines = [
            self.text,
            "",
            header + " Wilcoxon signed-rank: median difference, p, Holm p | reading |",
            "|---|---|---|---|",
        ]
        for name, w in sens["wilcoxon"].items():
            test = f"{w['median']:+.2f}, p = {w['p']:.3g}, Holm p = {w['p_holm']:.3g}"
            test += "" if w["exact"] else " (normal approx.)"
            lines.append(f"| `{name}` | {primary[name]['reading']} | {test} | **{w['reading']}** |")
        lines += [
            "",
            header + " seeds whose removal changes it (reading, mean, Holm p without it) |",
            "|---|---|---|",
        ]
        for name, loo in sens["leave_one_seed_out"].items():
            changes = loo["changes"]
            which = "; ".join(
                f"{c['seed']} ({c['reading']}, {c['mean']:+.2f}, {c['p_holm']:.3g})"
                for c in changes
            )
            text = f"{len(changes)} of {loo['seeds']}" + (f": {which}" if changes else "")
            lines.append(f"| `{name}` | {primary[name]['reading']} | {text} |")
        rules = {
            "difference": "the comparison's paired difference",
            "run": "either run's student among its method's",
        }
        for rule, compared in sens["without_outliers"].items():
            lines += [
                "",
                f"Without outlier seeds, rule: |z| > {sens['outlier_z']:g} of {rules[rule]} "
                "(mean and sd of all seeds):",
                "",
                header + " outlier seeds (difference; z; resumed runs) | without them | reading |",
                "|---|---|---|---|---|",
            ]
            for name, c in compared.items():
                outliers = "; ".join(
                    f"{o['seed']} ({o['difference']:+.2f}; "
                    + ", ".join(f"{what} z {z:+.1f}" for what, z in o["z"].items())
                    + (f"; resumed: {', '.join(o['resumed'])})" if o["resumed"] else ")")
                    for o in c["outliers"]
                )
                row = [f"`{name}`", primary[name]["reading"], outliers or "none"]
                row += [cell(c) if c["outliers"] else "-", f"**{c['reading']}**"]
                lines.append("| " + " | ".join(row) + " |")
        resumed = sens["resumed_runs"]
        steps = ", ".join(f"`{run}` ({', '.join(map(str, at))})" for run, at in resumed.items())
        lines += [
            "",
            f"Runs resumed from a checkpoint (`resumed_at_steps`, step): {len(resumed)}"
            + (f": {steps}." if resumed else "."),
        ]
        if self.secondary is not None:
            s = self.secondary
            second = "paired difference, points [95% CI]"
            columns = rule_columns(s.ahead_label)
            lines += ["", s.text, "", *comparison_lines(sens[s.key], s.label, second, columns)]
        if sens.get("parameters"):
            lines += ["", self.parameters_text, "", "| method | parameters |", "|---|---|"]
            for method, parts in sens["parameters"].items():
                counts = ", ".join(f"{part} {count:,}" for part, count in parts.items())
                lines.append(f"| `{method}` | {counts} |")
        ramps = sens.get("logged_rampup_weight")
        if ramps:
            epochs = next(iter(ramps.values()))
            lines += [
                "",
                self.rampup_text,
                "",
                "| method | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
                "|---" * (1 + len(epochs)) + "|",
            ]
            for method, by_epoch in ramps.items():
                cells = [", ".join(f"{w:.3g}" for w in weights) for weights in by_epoch.values()]
                lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
        return lines
