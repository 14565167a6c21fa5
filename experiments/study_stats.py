"""Statistics of the result tables: mean +- std over seeds, paired and unpaired differences of
top-1 in points with 95% t-intervals, their table cells, Holm's correction and the registered
reading of a comparison."""

from __future__ import annotations

import statistics

import scipy.stats


def mean_std(values: list[float]) -> str:
    if not values:
        return "pending"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def paired(mine: dict[int, float], theirs: dict[int, float], test: bool = True, scale=1.0) -> dict:
    """`scale * (mine - theirs)` over the seeds both have (`{seed: value}`), in seed order: the
    seeds, the differences and their mean and, with `test` and >= 2 pairs, the 95% t-interval,
    the two-sided paired t-test's p, the differences' standard deviation and how many are
    positive (`ahead`)."""
    seeds = sorted(set(mine) & set(theirs))
    diffs = [scale * (mine[s] - theirs[s]) for s in seeds]
    out = {"seeds": seeds, "differences": diffs, "n": len(diffs)}
    if diffs:
        out["mean"] = statistics.fmean(diffs)
    if test and len(diffs) >= 2:
        result = scipy.stats.ttest_1samp(diffs, 0.0)
        interval = result.confidence_interval(0.95)
        out.update(ci95=[interval.low, interval.high], p=float(result.pvalue))
        out.update(sd=statistics.stdev(diffs), ahead=sum(d > 0 for d in diffs))
    return out


def paired_difference(mine: list[dict], reference: list[dict], model: str = "student") -> dict:
    """Last-epoch top-1 of `mine` minus `reference` in points, paired by seed (the same seed
    gives both runs the same initialisation draws and batch order), with a 95% Student-t
    interval: `paired` on the runs' records, its mean and interval."""

    def last(records: list[dict]) -> dict[int, float]:
        return {r["seed"]: r["summary"][model]["last"] for r in records if model in r["summary"]}

    diff = paired(last(mine), last(reference), scale=100)
    out = {"n": diff["n"], "mean": diff.get("mean")}
    if "ci95" in diff:
        out["ci95"] = diff["ci95"]
    return out


def format_difference(diff: dict | None, reference: str | None) -> str:
    """`+0.40 [+0.15, +0.65] vs reference (n=3)`; "-" without a difference to show."""
    if diff is None:
        return "-"
    if diff.get("mean") is None:
        return "pending"
    text = f"{diff['mean']:+.2f}"
    if "ci95" in diff:
        low, high = diff["ci95"]
        text += f" [{low:+.2f}, {high:+.2f}]"
        if low > 0 or high < 0:
            text = f"**{text}**"
    n = "/".join(map(str, diff["n"])) if isinstance(diff["n"], list) else diff["n"]
    return f"{text} vs {reference} (n={n})" if reference else f"{text} (n={n})"


def difference_row(label: str, diff: dict | None) -> str:
    """One row of a report's `| comparison | difference |` table."""
    return f"| {label} | {format_difference(diff, None)} |"


def framework_difference(pytorch: list[float], jax_: list[float]) -> dict:
    """PyTorch minus JAX (top-1 in points), unpaired: the two draw different initial weights and
    batches for the same seed. Welch's 95% interval when both have >= 2 seeds."""
    out = {"n": [len(pytorch), len(jax_)]}
    if pytorch and jax_:
        out["mean"] = 100 * (statistics.fmean(pytorch) - statistics.fmean(jax_))
    if len(pytorch) >= 2 and len(jax_) >= 2:
        test = scipy.stats.ttest_ind(pytorch, jax_, equal_var=False)
        interval = test.confidence_interval(0.95)
        out["ci95"] = [100 * interval.low, 100 * interval.high]
    return out


def paired_t_power(sd: float, delta: float, n: int, alpha: float) -> float:
    """Power of a two-sided paired t-test at level `alpha` to detect a true mean difference
    `delta` between n pairs whose differences have standard deviation `sd` (noncentral t)."""
    df, noncentrality = n - 1, delta / (sd / n**0.5)
    critical = scipy.stats.t.ppf(1 - alpha / 2, df)
    return float(
        scipy.stats.nct.sf(critical, df, noncentrality)
        + scipy.stats.nct.cdf(-critical, df, noncentrality)
    )


def seeds_for_power(sd: float, delta: float, alpha: float, power: float = 0.8) -> int:
    """The fewest pairs (seeds) with `paired_t_power` >= `power`."""
    n = 2
    while paired_t_power(sd, delta, n, alpha) < power:
        n += 1
    return n


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (family-wise error over all of `p_values`)."""
    ordered = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for rank, name in enumerate(ordered):
        running = max(running, min(1.0, (len(ordered) - rank) * p_values[name]))
        adjusted[name] = running
    return adjusted


def reading(c: dict) -> str:
    """The registered rule: the reference "beats" a baseline where the Holm-adjusted p < 0.05
    and the difference is positive, "loses" where it is negative, "ties" otherwise."""
    if c["p_holm"] >= 0.05:
        return "ties"
    return "beats" if c["mean"] > 0 else "loses"


def read_with_holm(compared: dict) -> dict:
    """Adds the Holm-adjusted p (over every comparison of `compared` with a `p`) and the
    rule's reading to each tested comparison, in place."""
    tested = {name: c["p"] for name, c in compared.items() if "p" in c}
    for name, adjusted in holm(tested).items():
        compared[name]["p_holm"] = adjusted
        compared[name]["reading"] = reading(compared[name])
    return compared
