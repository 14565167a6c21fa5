"""How many seeds the powered comparison needs, from the first study's paired spreads.

    python experiments/study_power.py

Reads the first study's final runs (`experiments/results/archive/fashion_mnist_final.json`: 5 seeds,
the JAX runs), takes the standard deviation over seeds of FFCL's student minus each baseline's
(paired by seed), and prints the seeds a two-sided paired t-test needs to see a 0.3-point
difference with 80% power at Holm's strictest level (0.05 / the number of primary
comparisons), for the largest of those spreads and for a margin above it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import study_stats  # experiments/, beside this script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def paired_spreads(path: str, baselines: tuple[str, ...]) -> dict[str, float]:
    """Per baseline, the std over seeds of (FFCL's student - the baseline's), in points."""
    runs = json.load(open(path))["runs"]
    student = {
        (r["method"], r["seed"]): 100 * r["summary"]["student"]["last"]
        for r in runs
        if r["framework"] == "jax"
    }
    seeds = sorted(seed for method, seed in student if method == "ffcl")
    return {
        b: statistics.stdev([student["ffcl", s] - student[b, s] for s in seeds]) for b in baselines
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--first_study",
        default=os.path.join(ROOT, "experiments/results/archive/fashion_mnist_final.json"),
    )
    parser.add_argument("--delta", type=float, default=0.3, help="difference to see, points")
    parser.add_argument("--comparisons", type=int, default=9, help="primary comparisons (Holm)")
    args = parser.parse_args(argv)
    spreads = paired_spreads(args.first_study, ("independent", "kd", "dml", "ffl"))
    alpha = 0.05 / args.comparisons
    for baseline, sd in spreads.items():
        print(f"FFCL - {baseline}: paired std {sd:.2f} points over 5 seeds")
    largest = max(spreads.values())
    for sd in (largest, 1.25 * largest):
        n = study_stats.seeds_for_power(sd, args.delta, alpha)
        print(
            f"std {sd:.2f}: {n} seeds for 80% power to see {args.delta} points at "
            f"alpha {alpha:.4f} (0.05 / {args.comparisons}), two-sided paired t"
        )


if __name__ == "__main__":
    main()
