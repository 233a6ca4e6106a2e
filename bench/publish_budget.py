#!/usr/bin/env python3
"""Hub publish throughput with the history budget enforced vs the hub before it existed.

Builds crates/shard-core/benches/publish.rs twice in release mode — against this tree, and
against BASE (the commit before the budget; a temporary git worktree under target/ with the
bench file copied in and built with its `baseline` feature, which only switches the two API
calls that changed) — then runs the two binaries alternately, round after round, so both
see the same machine state. Each run is a fresh process doing every workload once (see the
bench file); the first round is reported apart from the warm rounds and left out of the
medians.

    python3 bench/publish_budget.py [--rounds 6] [--budget 67108864] [--base <commit>]
                                    [--only fanout|hot|keys|mixed] [--reuse]

`--reuse` runs the two executables the last build kept in target/bench-publish (their
sha256 and build time are recorded); `--only` runs one workload.

Result: bench/results/publish-budget-<timestamp>.json (commit, base, machine, flags, every
run) and a markdown table on stdout: median ops/s per workload, ratio current / base.
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (machine())

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BENCH = "crates/shard-core/benches/publish.rs"
# main just before the history budget (issue 18) landed.
DEFAULT_BASE = "6b87ac64b051016f6028c8de1edfbd961d1d68b7"


def sh(args, **kw):
    return subprocess.run(args, check=True, text=True, **kw)


def git(*args, cwd=REPO):
    return sh(["git", *args], cwd=cwd, capture_output=True).stdout.strip()


def build(tree: Path, features: list, target_dir: Path, keep_as: str) -> Path:
    """Builds the publish bench in `tree`; returns a copy of the executable (the two builds
    share a target dir, where they might otherwise overwrite each other's)."""
    args = ["cargo", "bench", "--no-run", "--message-format=json", "-p", "shard-core",
            "--bench", "publish", *features]
    env = dict(os.environ, CARGO_TARGET_DIR=str(target_dir))
    out = sh(args, cwd=tree, env=env, capture_output=True).stdout
    exe = None
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == "publish" and msg.get("executable"):
            exe = msg["executable"]
    if not exe:
        raise SystemExit(f"no publish bench executable built in {tree}")
    keep = target_dir / "bench-publish" / keep_as
    keep.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(exe, keep)
    return keep


def base_tree(base: str) -> Path:
    """A worktree of `base` with the bench file of this tree and a `baseline` feature."""
    tree = REPO / "target" / "bench-base"
    if tree.exists():
        sh(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO)
    sh(["git", "worktree", "add", "--detach", str(tree), base], cwd=REPO, capture_output=True)
    shutil.copy(REPO / BENCH, tree / BENCH)
    manifest = tree / "crates" / "shard-core" / "Cargo.toml"
    text = manifest.read_text()
    if 'name = "publish"' not in text:
        text += '\n[[bench]]\nname = "publish"\nharness = false\n'
    text += '\n[features]\nbaseline = []\n'
    manifest.write_text(text)
    return tree


def run(exe: Path, budget: int, only) -> list:
    args = [str(exe), "--budget", str(budget), "--rounds", "1", *(["--only", only] if only else [])]
    out = sh(args, capture_output=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds (the first is reported apart)")
    ap.add_argument("--budget", type=int, default=64 << 20, help="history_budget of the current hub, bytes")
    ap.add_argument("--base", default=DEFAULT_BASE, help="commit of the hub before the budget")
    ap.add_argument("--only", help="one workload (fanout, hot, keys, mixed)")
    ap.add_argument("--reuse", action="store_true",
                    help="run the binaries the last build left in target/bench-publish (no build)")
    a = ap.parse_args()

    at_start = bench.machine()
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    # One target dir for both builds (the repository's): dependencies are compiled once.
    target = REPO / "target"
    kept = target / "bench-publish"
    tree = None
    if a.reuse:
        current, base = kept / "current", kept / "base"
    else:
        print("building the current hub's bench ...", flush=True)
        current = build(REPO, [], target, "current")
        print(f"building the base hub's bench ({a.base[:10]}) ...", flush=True)
        tree = base_tree(a.base)
    try:
        if tree is not None:
            base = build(tree, ["--features", "baseline"], target, "base")
        runs = []
        for rnd in range(1, a.rounds + 1):
            # Alternate which goes first, so neither always runs on a machine the other warmed.
            order = [("base", base), ("current", current)]
            if rnd % 2 == 0:
                order.reverse()
            for side, exe in order:
                for r in run(exe, a.budget, a.only):
                    r.update({"side": side, "round": rnd, "loadavg": os.getloadavg()})
                    runs.append(r)
                    print(f"round {rnd} {side:8} {r['workload']:7} {r['ops_per_sec']:>12,.0f} ops/s", flush=True)
    finally:
        if tree is not None:
            sh(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO)

    workloads = list(dict.fromkeys(r["workload"] for r in runs))
    summary = {}
    for w in workloads:
        def rates(side, warm):
            return [r["ops_per_sec"] for r in runs
                    if r["workload"] == w and r["side"] == side and (r["round"] > 1) == warm]
        b, c = statistics.median(rates("base", True)), statistics.median(rates("current", True))
        # Ratios of the runs made side by side in each warm round.
        pairs = [c_ / b_ for b_, c_ in zip(rates("base", True), rates("current", True))]
        summary[w] = {
            "base_median_ops_per_sec": b, "current_median_ops_per_sec": c, "ratio_of_medians": c / b,
            "ratio_per_round": pairs, "median_ratio": statistics.median(pairs),
            "first_round": {"base": rates("base", False), "current": rates("current", False)},
        }
    results = {
        "machine": {**at_start, "loadavg_at_end": os.getloadavg()}, "command": " ".join(sys.argv), "commit": commit, "dirty_tree": dirty,
        "base": a.base, "flags": {"rounds": a.rounds, "budget": a.budget, "only": a.only, "reuse": a.reuse},
        "binaries": {side: {"path": str(exe), "sha256": hashlib.sha256(exe.read_bytes()).hexdigest(),
                            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exe.stat().st_mtime))}
                     for side, exe in (("current", current), ("base", base))},
        "build": "cargo bench (release profile: thin LTO, codegen-units 4)",
        "summary": summary, "runs": runs,
    }
    print("\n| workload | base ops/s (median) | current ops/s (median) | current / base (median of rounds) | first round base / current |")
    print("|---|---|---|---|---|")
    for w, s in summary.items():
        f = s["first_round"]
        print(f"| {w} | {s['base_median_ops_per_sec']:,.0f} | {s['current_median_ops_per_sec']:,.0f} | "
              f"{s['median_ratio']:.3f} ({', '.join(f'{x:.2f}' for x in s['ratio_per_round'])}) | "
              f"{f['base'][0]:,.0f} / {f['current'][0]:,.0f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"publish-budget-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"\nraw results: {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
