"""Records or checks the fingerprints of every preset (tests/helpers/fingerprints.py).

    .venv/bin/python scripts/fingerprint.py --check            # compare with the record
    .venv/bin/python scripts/fingerprint.py --record [--only ffcl,pcl]   # rewrite the record

A refactoring must leave every fingerprint unchanged; a change that means to move one rewrites
the record in a commit of its own whose message says what moved and why.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
RECORD = os.path.join(REPO, "tests", "data", "fingerprints.json")


def main() -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from tests.helpers import fingerprints

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", action="store_true")
    mode.add_argument("--check", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated case names (default: all)")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(fingerprints.CASES)
    unknown = sorted(set(names) - set(fingerprints.CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; valid: {', '.join(fingerprints.CASES)}")
    record = {}
    if os.path.exists(RECORD):
        with open(RECORD) as f:
            record = json.load(f)
    failed = 0
    for name in names:
        current = fingerprints.compute(name)
        if args.record:
            record[name] = current
            print(f"{name}: recorded")
            continue
        problems = fingerprints.compare(record[name], current) if name in record else ["absent"]
        failed += bool(problems)
        print(f"{name}: {'same' if not problems else 'DIFFERS'}")
        for line in problems:
            print(f"  {line}")
    if args.record:
        with open(RECORD, "w") as f:
            json.dump({k: record[k] for k in sorted(record)}, f, indent=1)
            f.write("\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
