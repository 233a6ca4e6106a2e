#!/usr/bin/env python3
"""The plan's central experiment: does FIFO pacing of new connections help one ws-lb process
past its capacity? (issue 14, deliverable 3)

One ws-shard process (3 shards) and one ws-lb, both with their documented defaults except
where they must be placed (ports, backend URLs); the only flag that differs between the
arms is the subject: pacing at its defaults (`admission_rate` 10,000/s since 2026-11-30, burst
500, max wait 3 s, queue 20,000) vs `--admission-rate 0` (no pacing); `--arms` adds `wait10s`
(`--admission-max-wait 10s`), `rate10k` (`--admission-rate 10000`, the default now) and `rate5k`
(`--admission-rate 5000`, the default before). The per-IP limit stays at its default
(100/s, burst 200): the clients come from 512 source addresses (127.0.1.0-127.0.2.255), so
it never binds below 51,200/s.

Two loads, each on fresh servers and run twice per start (the first run after the start is
reported apart from the second, warm one):

  burst  20,000 connections at 10,000/s (past one ws-lb's ~5,000-7,000/s on this box in
         2026-11-29's runs; a faster day on 2026-11-30 completed 98-100 % of it), each
         living 0.5 s (`--lifetime`: about 5,000 open at once, inside the descriptor limit)
  sustained  70,000 connections at 7,000/s for 10 s (past capacity for long enough that a
         queue cannot drain within the burst), each living 0.5 s, two loadtest workers
         (descriptors)
  storm  8,000 clients at once (a reconnect storm: every held client of an LB arriving
         together; asked at 80,000/s, as fast as the generator goes), held 3 s

Every client subscribes to one channel; it counts as established when `subscribed` arrives
within the loadtest's default 5 s. Per run: success, handshake p50/p99, the failures by kind
(`closed_1013` from the admission queue, timeouts, ...), ws-lb's admission rejections by
reason, and the CPU seconds of ws-lb and of ws-shard over the run. The arms alternate
(each pair rotates their order) for `--pairs` pairs; the table gives each run and medians.

Results: bench/results/pacing-<timestamp>.json and a markdown table on stdout.
Usage: pacing.py [--pairs 3] [--loads burst,storm] [--arms pacing,off,wait10s,rate10k,rate5k]. Every wait is bounded.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
from odin import Procs, free_port, port_free, http_get, wait_http  # noqa: E402
import odin  # noqa: E402

BIN = bench.BIN
LT = bench.LT
SOURCES = "127.0.1.0-127.0.2.255"
LOADS = {
    "burst": {"connections": 20000, "rate": 10000, "lifetime": "0.5s", "hold": "2s"},
    "storm": {"connections": 8000, "rate": 80000, "lifetime": "0", "hold": "3s"},
    "sustained": {"connections": 70000, "rate": 7000, "lifetime": "0.5s", "hold": "2s", "workers": 2},
}
# The subject: pacing at its defaults vs off; `--arms` adds variants of the defaults.
ARMS = {"pacing": [], "off": ["--admission-rate", "0"],
        "wait10s": ["--admission-max-wait", "10s"], "rate10k": ["--admission-rate", "10000"],
        "rate5k": ["--admission-rate", "5000"]}


def start_servers(procs, arm):
    base = free_port()
    while any(not port_free(base + i) for i in range(3)):
        base = free_port()
    shard_admin = free_port()
    shard_args = [str(BIN / "ws-shard"), "--shards", "3", "--base-port", str(base),
                  "--admin-addr", f"127.0.0.1:{shard_admin}"]
    shard = procs.start("shard", shard_args)
    for i in range(3):
        wait_http(f"http://127.0.0.1:{base + i}/health", 60)
    lb_port, lb_admin = free_port(), free_port()
    lb_args = [str(BIN / "ws-lb"), "--listen", f"127.0.0.1:{lb_port}", "--admin-addr", f"127.0.0.1:{lb_admin}",
               "--backend-urls", ",".join(f"ws://127.0.0.1:{base + i}/ws" for i in range(3)), *ARMS[arm]]
    lb = procs.start("lb", lb_args)
    wait_http(f"http://127.0.0.1:{lb_port}/health", 60)
    return {"shard": shard, "lb": lb, "lb_port": lb_port, "lb_admin": lb_admin,
            "args": {"ws-shard": shard_args, "ws-lb": lb_args}}


def rejections(admin):
    body = http_get(f"http://127.0.0.1:{admin}/metrics")[1]
    out = {}
    for line in body.splitlines():
        if line.startswith("ws_lb_admission_rejections_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = out.get(reason, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out


def run_load(srv, load):
    spec = LOADS[load]
    out = Path(tempfile.mkdtemp()) / "report.json"
    args = [str(LT), "--url", f"ws://127.0.0.1:{srv['lb_port']}/ws", "--connections", str(spec["connections"]),
            "--rate", str(spec["rate"]), "--hold", spec["hold"], "--lifetime", spec["lifetime"],
            "--channels", "md.k{0..999}", "--source-ips", SOURCES, "--json", str(out), "--quiet",
            "--workers", str(spec.get("workers", 1))]
    rej0 = rejections(srv["lb_admin"])
    cpu0 = (bench.proc_cpu_s(srv["lb"].pid), sum(bench.proc_cpu_s(p) for p in bench.tree_pids(srv["shard"].pid)))
    load0 = bench.load()
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if not out.exists():
        raise SystemExit(f"loadtest wrote no report: {r.stdout[-2000:]} {r.stderr[-2000:]}")
    rep = json.loads(out.read_text())
    # Both servers settle (every client of the run gone) before their CPU is read.
    odin.wait_for(lambda: odin.metric(http_get(f"http://127.0.0.1:{srv['lb_admin']}/metrics")[1],
                                      "ws_lb_active_connections") < 1, 60, "ws-lb to have no client left")
    cpu1 = (bench.proc_cpu_s(srv["lb"].pid), sum(bench.proc_cpu_s(p) for p in bench.tree_pids(srv["shard"].pid)))
    rej1 = rejections(srv["lb_admin"])
    row = bench.summarize(rep)
    row.update({
        "load": load, "loadavg_before": load0, "loadavg_after": bench.load(),
        "lb_cpu_s": round(cpu1[0] - cpu0[0], 3), "shard_cpu_s": round(cpu1[1] - cpu0[1], 3),
        "lb_cpu_us_per_attempt": round(1e6 * (cpu1[0] - cpu0[0]) / max(rep["counts"]["attempted"], 1), 1),
        "rejections": {k: v - rej0.get(k, 0) for k, v in rej1.items() if v - rej0.get(k, 0)},
        "loadtest_args": args,
    })
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--loads", default="burst,storm")
    ap.add_argument("--arms", default="pacing,off", help=f"comma list of {', '.join(ARMS)}")
    a = ap.parse_args()
    loads = [x for x in a.loads.split(",") if x]
    arms = [x for x in a.arms.split(",") if x]
    if not arms or any(x not in ARMS for x in arms):
        raise SystemExit(f"--arms: choose from {', '.join(ARMS)}")
    for x in loads:
        if x not in LOADS:
            raise SystemExit(f"unknown load {x!r} (burst, storm)")
    result = {"commit": bench.commit_of(bench.REPO), "machine": bench.machine(), "command": " ".join(sys.argv),
              "loads": {x: LOADS[x] for x in loads}, "arms": {x: ARMS[x] for x in arms}, "source_ips": SOURCES, "runs": []}
    for pair in range(a.pairs):
        # Alternate: each pair rotates the order of the arms.
        order = arms[pair % len(arms):] + arms[:pair % len(arms)]
        for arm in order:
            for load in loads:
                procs = Procs("pacing")
                try:
                    srv = start_servers(procs, arm)
                    for which in ("first", "warm"):
                        row = run_load(srv, load)
                        row.update({"pair": pair, "arm": arm, "which": which, "processes": srv["args"]})
                        result["runs"].append(row)
                        print(f"pair {pair} {arm:6} {load} {which:5}: {row['established']}/{row['attempted']} "
                              f"p50 {row['handshake_p50_ms']:.1f} p99 {row['handshake_p99_ms']:.1f} ms, "
                              f"lb CPU {row['lb_cpu_s']:.2f} s, failures {row['failures']}, "
                              f"rejections {row['rejections']}, load {row['loadavg_after'][0]}", flush=True)
                finally:
                    procs.stop()
    bench.save("pacing", result)
    print("\n| load | run | arm | runs | success % (each) | handshake p99 ms (each) | 1013 closes (median) | timeouts (median) | ws-lb CPU µs/attempt (median) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for load in loads:
        for which in ("first", "warm"):
            for arm in arms:
                rows = [r for r in result["runs"] if r["load"] == load and r["which"] == which and r["arm"] == arm]
                if not rows:
                    continue
                succ = ", ".join(f"{r['success_pct']:.2f}" for r in rows)
                p99 = ", ".join(f"{r['handshake_p99_ms']:.0f}" for r in rows)
                c1013 = bench.median([r["failures"].get("closed_1013", 0) for r in rows])
                tmo = bench.median([sum(v for k, v in r["failures"].items() if "timeout" in k) for r in rows])
                cpu = bench.median([r["lb_cpu_us_per_attempt"] for r in rows])
                print(f"| {load} | {which} | {arm} | {len(rows)} | {succ} | {p99} | {c1013} | {tmo} | {cpu} |")


if __name__ == "__main__":
    main()
