#!/usr/bin/env python3
"""Runs Autobahn|Testsuite's fuzzing-client cases (through `kosoku`, which runs Autobahn's
own case definitions from Python 3) against (a) a shard's /echo endpoint directly and (b) the
same shard through ws-lb, then prints a result table and fails on any case whose verdict is
not OK, NON-STRICT or INFORMATIONAL.

    run.py --bin target/release --cases all    # sections 1-7, 9, 10: 301 cases
    run.py --bin target/debug --cases short    # sections 1-7, 10 (no 9.*: performance)

The servers are started here on free loopback ports and stopped at the end.
"""

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "pylib"))
import odin  # noqa: E402

ACCEPTABLE = {"OK", "NON-STRICT", "INFORMATIONAL"}


def run_kosoku(url: str, cases: str, out: Path) -> dict:
    args = ["kosoku", "-m", "fuzzingclient", "-p", "2", "-o", str(out)]
    args += ["-x", "12.*", "-x", "13.*"]
    if cases == "short":
        args += ["-x", "9.*"]
    args.append(url)
    started = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    took = time.time() - started
    index = out / "index.json"
    if not index.exists():
        print(proc.stdout[-2000:], proc.stderr[-2000:])
        raise SystemExit(f"kosoku wrote no report for {url}")
    results = {}
    for _agent, cases_ in json.loads(index.read_text()).items():
        for case, r in cases_.items():
            results[case] = (r["behavior"], r["behaviorClose"])
    return {"results": results, "seconds": took}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release")
    ap.add_argument("--cases", choices=["all", "short"], default="all")
    ap.add_argument("--out", default="target/conformance")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shard, shard_admin, lb, lb_admin, mux, mux_admin = (odin.free_port() for _ in range(6))
    with odin.Procs("conformance") as procs:
        procs.start("shard", [f"{a.bin}/ws-shard", "--shards", "1", "--base-port", shard,
                              "--admin-addr", f"127.0.0.1:{shard_admin}", "--echo", "--log-level", "warn"])
        procs.start("lb", [f"{a.bin}/ws-lb", "--listen", f"127.0.0.1:{lb}", "--admin-addr", f"127.0.0.1:{lb_admin}",
                           "--backend-urls", f"ws://127.0.0.1:{shard}/echo", "--per-ip-rate", "0",
                           "--log-level", "warn"])
        # The same relay with the tier link (--tier-mux): the client's frames travel as a
        # stream of one connection to the shard and must arrive exactly as on a socket.
        procs.start("lb-mux", [f"{a.bin}/ws-lb", "--listen", f"127.0.0.1:{mux}", "--admin-addr", f"127.0.0.1:{mux_admin}",
                               "--backend-urls", f"ws://127.0.0.1:{shard}/echo", "--per-ip-rate", "0",
                               "--tier-mux", "--log-level", "warn"])
        odin.wait_http(f"http://127.0.0.1:{shard}/health", ready=odin.ok)
        odin.wait_http(f"http://127.0.0.1:{lb}/health", ready=odin.ok)
        odin.wait_http(f"http://127.0.0.1:{mux}/health", ready=odin.ok)
        runs = {
            "direct (ws-shard /echo)": run_kosoku(f"ws://127.0.0.1:{shard}/echo", a.cases, out / "direct"),
            "through ws-lb": run_kosoku(f"ws://127.0.0.1:{lb}/ws", a.cases, out / "via-lb"),
            "through ws-lb, tier link": run_kosoku(f"ws://127.0.0.1:{mux}/ws", a.cases, out / "via-lb-mux"),
        }
    bad = []
    print(f"\n| configuration | cases | OK | NON-STRICT | INFORMATIONAL | FAILED/other | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        counts = collections.Counter(b for b, _ in run["results"].values())
        other = sum(v for k, v in counts.items() if k not in ACCEPTABLE)
        print(f"| {name} | {len(run['results'])} | {counts['OK']} | {counts['NON-STRICT']} | "
              f"{counts['INFORMATIONAL']} | {other} | {run['seconds']:.0f} |")
        for case, (b, c) in sorted(run["results"].items()):
            if b not in ACCEPTABLE:
                bad.append(f"{name}: {case} {b} / close {c}")
            elif b != "OK":
                print(f"    {case}: {b} (close: {c})")
    if bad:
        raise SystemExit("non-conforming cases:\n" + "\n".join(bad))
    print("conformance: no FAILED case")


if __name__ == "__main__":
    main()
