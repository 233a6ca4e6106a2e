#!/usr/bin/env python3
"""Compares two conformance runs (`run.py --out A`, `run.py --out B`) case by case: the
verdict, the close verdict and the close code the server sent, for each configuration
(direct, via-lb). Prints every difference and exits non-zero if there is one, so "Autobahn
results identical" between two builds is one command:

    python3 tests/conformance/run.py --bin ../base/target/release --out target/conf-base
    python3 tests/conformance/run.py --bin target/release --out target/conf-new
    python3 tests/conformance/diff.py target/conf-base target/conf-new
"""

import json
import sys
from pathlib import Path

FIELDS = ("behavior", "behaviorClose", "remoteCloseCode")


def cases(index: Path) -> dict:
    """case id -> the compared fields (the agent key holds the server's address: ignored)."""
    out = {}
    for _agent, by_case in json.loads(index.read_text()).items():
        for case, r in by_case.items():
            out[case] = tuple(r.get(f) for f in FIELDS)
    return out


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    a_dir, b_dir = Path(sys.argv[1]), Path(sys.argv[2])
    differences = 0
    for config in ("direct", "via-lb"):
        a, b = cases(a_dir / config / "index.json"), cases(b_dir / config / "index.json")
        diff = sorted(c for c in a.keys() | b.keys() if a.get(c) != b.get(c))
        for c in diff:
            print(f"{config} {c}: {a.get(c)} -> {b.get(c)}")
        differences += len(diff)
        print(f"{config}: {len(a)} / {len(b)} cases, {len(diff)} differ ({', '.join(FIELDS)})")
    sys.exit(1 if differences else 0)


if __name__ == "__main__":
    main()
