#!/usr/bin/env python3
"""The first ramp after a start, and what stalls it (issue 14's cold start).

For each build (`--a`, `--b`; directories with ws-shard and ws-lb), alternating round by
round, on fresh servers with their documented defaults (one ws-shard process of 3 shards, one
ws-lb): the descriptor-table size of the fresh ws-lb (`FDSize`), then the first ramp
(`--connections` at `--rate`, held 1 s, 512 source addresses so the per-IP limit never binds)
while `perf trace --duration 2` records every system call of ws-lb that takes over 2 ms. The
warm ramp (the same again) follows on the same servers. Reported per run: handshake p50 / p99
of both ramps, p99 per second of the first, and the slow `accept4` / `socket` calls with the
descriptor each returned (a table growth shows as descriptor 256, 512, 1024, 2048, ...).

    python3 bench/cold_start.py --a /tmp/old-bin --b target/release [--rounds 3]

Without `perf` the slow-call columns are empty. Result: bench/results/cold-start-<time>.json.
"""

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "pylib"))
import bench  # noqa: E402
import odin  # noqa: E402

SLOW_CALL = re.compile(r"\(\s*([\d.]+) ms\): \S+ (accept4|socket)\(.*\)\s+= (\d+)")


def fd_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("FDSize:"):
            return int(line.split()[1])
    return 0


def ramp(url: str, connections: int, rate: int) -> dict:
    r = bench.loadtest(url, connections, rate, 1, source_ips=bench.SOURCE_IPS)
    row = bench.summarize(r)
    row["p99_per_second_ms"] = [round((t.get("handshake_p99_us") or 0) / 1000, 1) for t in r.get("timeline", [])]
    return row


def one(build: str, bin_dir: Path, a) -> dict:
    with odin.Procs("cold") as procs:
        shard, ports, _ = bench.start_shards(procs, bin_dir=bin_dir, defaults=True)
        lb, port, _ = bench.start_lb(procs, ports, bin_dir=bin_dir, defaults=True)
        run = {"build": build, "bin_dir": str(bin_dir), "commit": bench.commit_of(bin_dir),
               "lb_fd_table_at_start": fd_size(lb.pid), "commands": [p.args for p in procs.started]}
        trace_file = Path(tempfile.mkdtemp()) / "trace.txt"
        tracer = None
        if shutil.which("perf"):
            seconds = a.connections / a.rate + 4
            tracer = subprocess.Popen(["perf", "trace", "-p", str(lb.pid), "--duration", "2", "-o", str(trace_file),
                                       "--", "sleep", str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            odin.wait_for(lambda: trace_file.exists(), 10, "perf trace to start")
        url = f"ws://127.0.0.1:{port}/ws"
        run["first"] = ramp(url, a.connections, a.rate)
        if tracer:
            tracer.wait(timeout=120)
            calls = [m.groups() for m in map(SLOW_CALL.search, trace_file.read_text().splitlines()) if m]
            run["slow_calls"] = [{"ms": float(ms), "call": c, "returned_fd": int(fd)} for ms, c, fd in calls]
        run["warm"] = ramp(url, a.connections, a.rate)
        run["lb_fd_table_at_end"] = fd_size(lb.pid)
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", help="directory with build A's ws-shard and ws-lb (optional)")
    p.add_argument("--b", default=str(bench.BIN), help="directory with build B's binaries (default: target/release)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=6000)
    p.add_argument("--rate", type=int, default=1000)
    a = p.parse_args()
    # The loadtest command line of every ramp (the servers' are in each run's "commands").
    lt = [str(bench.LT), "--connections", str(a.connections), "--rate", str(a.rate), "--hold", "1",
          "--source-ips", bench.SOURCE_IPS]
    builds = [("A", Path(a.a))] if a.a else []
    builds.append(("B", Path(a.b)))
    runs = []
    for r in range(a.rounds):
        for name, d in (builds if r % 2 == 0 else builds[::-1]):
            run = one(name, d, a)
            run["round"] = r + 1
            runs.append(run)
            slow = run.get("slow_calls")
            print(f"round {r + 1} {name}: fd table {run['lb_fd_table_at_start']}; first p50/p99 "
                  f"{run['first']['handshake_p50_ms']:.2f}/{run['first']['handshake_p99_ms']:.2f} ms {run['first']['p99_per_second_ms']}; "
                  f"warm {run['warm']['handshake_p50_ms']:.2f}/{run['warm']['handshake_p99_ms']:.2f} ms; slow accept4/socket "
                  + ("-" if slow is None else f"{len(slow)}: " + ", ".join(f"{s['call']}->{s['returned_fd']} {s['ms']:.1f} ms" for s in slow)),
                  flush=True)
    print("\n| build | runs | first p99 (median) | warm p99 (median) | slow accept4/socket per first ramp (median) |")
    print("|---|---|---|---|---|")
    for name, _ in builds:
        mine = [r for r in runs if r["build"] == name]
        slow = [len(r["slow_calls"]) for r in mine if "slow_calls" in r]
        print(f"| {name} | {len(mine)} | {bench.median([r['first']['handshake_p99_ms'] for r in mine]):.2f} ms | "
              f"{bench.median([r['warm']['handshake_p99_ms'] for r in mine]):.2f} ms | {bench.median(slow) if slow else '-'} |")
    bench.save("cold-start", {"machine": bench.machine(), "command": " ".join(sys.argv), "runs": runs,
                              "flags": {"connections": a.connections, "rate": a.rate, "rounds": a.rounds},
                              "loadtest": lt})


if __name__ == "__main__":
    main()
