#!/usr/bin/env python3
"""Memory per held connection with the history budget vs the shard before it: `bench.py hold`
(its defaults: 100,000 connections through 12 ws-lb and 8 ws-shard processes, held 60 s) run
alternately on two directories of release binaries, round after round, so both see the same
machine state. The first round is reported apart from the warm rounds and left out of the
medians.

    python3 bench/hold_budget.py --base-bin DIR [--current-bin target/release] [--rounds 3]

DIR holds the base commit's `ws-shard` (and, if present there, its `ws-lb` and `loadtest`;
otherwise the current ones are used, so only the shard differs). To build it:

    git worktree add --detach /tmp/base 6b87ac6
    (cd /tmp/base && CARGO_TARGET_DIR=$PWD/target cargo build --release --locked -p ws-shard)

Result: bench/results/hold-budget-<timestamp>.json (both commits, machine, load average per
run, every run's row) and a markdown table on stdout; the per-run `hold-*.json` files that
`bench.py` writes are folded into it and removed.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "pylib"))
import odin  # noqa: E402

REPO = odin.REPO
RESULTS = REPO / "bench" / "results"
# main just before the history budget (issue 18) landed.
DEFAULT_BASE = "6b87ac64b051016f6028c8de1edfbd961d1d68b7"
KEYS = ("established", "active_end_of_hold", "success_pct", "handshake_p99_ms", "lb_kib_per_conn",
        "shard_kib_per_conn", "lb_rss_held_mib", "shard_rss_held_mib")


def bin_dir(side: str, primary: Path, fallback: Path) -> Path:
    """A directory with ws-shard from `primary` and ws-lb / loadtest from `primary` if there,
    else from `fallback` (symlinks in a directory under target/)."""
    out = REPO / "target" / "hold-budget" / side
    out.mkdir(parents=True, exist_ok=True)
    for name in ("ws-shard", "ws-lb", "loadtest"):
        src = primary / name if (primary / name).exists() or name == "ws-shard" else fallback / name
        link = out / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src.resolve())
    return out


def one_run(bins: Path, extra: list) -> dict:
    before = set(RESULTS.glob("hold-2*.json"))
    load0 = os.getloadavg()
    r = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "hold", *extra],
                       env=dict(os.environ, ODIN_BIN=str(bins)), capture_output=True, text=True, timeout=3600)
    new = sorted(set(RESULTS.glob("hold-2*.json")) - before)
    if r.returncode != 0 or not new:
        print(r.stdout[-3000:], r.stderr[-3000:])
        raise SystemExit("bench.py hold failed")
    data = json.loads(new[-1].read_text())
    for p in new:
        p.unlink()
    row = data["run"]
    row.pop("report", None)
    row["loadavg_before"] = load0
    row["loadavg_after"] = os.getloadavg()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-bin", type=Path, required=True, help="release binaries of the base commit")
    ap.add_argument("--current-bin", type=Path, default=odin.release_bin())
    ap.add_argument("--base", default=DEFAULT_BASE, help="commit the base binaries were built from (recorded)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (the first is reported apart)")
    a, extra = ap.parse_known_args()
    sides = {"base": bin_dir("base", a.base_bin, a.current_bin),
             "current": bin_dir("current", a.current_bin, a.current_bin)}
    runs = []
    for rnd in range(1, a.rounds + 1):
        order = ["base", "current"] if rnd % 2 else ["current", "base"]
        for side in order:
            row = one_run(sides[side], extra)
            row.update({"side": side, "round": rnd})
            runs.append(row)
            print(f"round {rnd} {side:8} established {row['established']:>7} shard {row['shard_kib_per_conn']:.2f} "
                  f"KiB/conn  lb {row['lb_kib_per_conn']:.2f} KiB/conn  load {row['loadavg_before'][0]:.1f}", flush=True)

    def med(side, key, warm=True):
        v = [r[key] for r in runs if r["side"] == side and (r["round"] > 1) == warm]
        return statistics.median(v) if v else None

    summary = {side: {k: med(side, k) for k in KEYS} for side in ("base", "current")}
    # Per-connection RSS amortises fixed costs over the connections held: a round compares
    # only when both sides held every connection it attempted.
    paired = []
    for rnd in range(1, a.rounds + 1):
        b = next(r for r in runs if r["round"] == rnd and r["side"] == "base")
        c = next(r for r in runs if r["round"] == rnd and r["side"] == "current")
        full = all(r["active_end_of_hold"] == r["attempted"] for r in (b, c))
        paired.append({"round": rnd, "both_held_all": full,
                       "shard_ratio": c["shard_kib_per_conn"] / b["shard_kib_per_conn"],
                       "lb_ratio": c["lb_kib_per_conn"] / b["lb_kib_per_conn"]})
    summary["per_round_current_over_base"] = paired
    summary["first_round"] = {side: {k: med(side, k, warm=False) for k in KEYS} for side in ("base", "current")}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    results = {
        "machine": {"cpus": os.cpu_count(), "kernel": os.uname().release,
                    "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "command": " ".join(sys.argv), "commit": commit, "base": a.base,
        "loadavg_at_end": os.getloadavg(),
        "bins": {k: {n: str((v / n).resolve()) for n in ("ws-shard", "ws-lb", "loadtest")} for k, v in sides.items()},
        "flags": {"rounds": a.rounds, "bench_hold_flags": extra},
        "summary": summary, "runs": runs,
    }
    print("\n| side | runs (warm) | established | shard KiB/conn | LB KiB/conn | shard RSS held | first round shard KiB/conn |")
    print("|---|---|---|---|---|---|---|")
    for side in ("base", "current"):
        s, f = summary[side], summary["first_round"][side]
        n = len([r for r in runs if r["side"] == side and r["round"] > 1])
        print(f"| {side} | {n} | {s['established']:,.0f} | {s['shard_kib_per_conn']:.2f} | {s['lb_kib_per_conn']:.2f} | "
              f"{s['shard_rss_held_mib']:.0f} MiB | {f['shard_kib_per_conn']:.2f} |")
    print("\n| round | both held every connection | shard KiB/conn current / base | LB KiB/conn current / base |")
    print("|---|---|---|---|")
    for p in paired:
        print(f"| {p['round']}{' (first)' if p['round'] == 1 else ''} | {'yes' if p['both_held_all'] else 'no'} | "
              f"{p['shard_ratio']:.3f} | {p['lb_ratio']:.3f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"hold-budget-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"\nraw results: {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
