#!/usr/bin/env python3
"""System calls and CPU per fan-out delivery, two builds side by side (issue 14).

The `make bench-fanout` shapes (dense: 1,000 subscribers each on all 10 channels; wide: 5,000
subscribers each on one of 10 channels), through one ws-lb to one ws-shard process of 3 shards
and directly to those shards (connections spread over all three), with the same `loadtest`
for every run. While the publisher runs, `perf stat` counts every system call the shard
process and the ws-lb process enter (the `raw_syscalls:sys_enter` tracepoint, and the I/O calls
one by one: counting tracepoints costs little, unlike `strace`, which stops the process at
every call), and /proc gives their CPU time; the shard's `ws_shard_deliveries_total` over the
same window is the denominator.

    python3 bench/fanout_syscalls.py --a /tmp/base-bin --b target/release \
        [--b-shard-flags="--write-delay 2ms"] [--rounds 3] [--shapes dense wide] [--paths ws-lb direct]

Builds alternate within each round (A B, then B A, ...), every run on fresh servers; the first
round is reported apart and the medians are over the rest. A side's non-default flags
(`--a-shard-flags`, `--b-shard-flags`, `--a-lb-flags`, `--b-lb-flags`) are recorded with the
full command line of every process. Result: bench/results/fanout-syscalls-<time>.json and a
markdown table on stdout.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "pylib"))
import bench  # noqa: E402
import odin  # noqa: E402

SHAPES = {
    "dense": {"subscribers": 1000, "per_conn": 10},
    "wide": {"subscribers": 5000, "per_conn": 1},
}
# What the fan-out benchmark always passes (not defaults; recorded in the result).
SHARD_BENCH_FLAGS = ["--outbound-queue", "4096"]
EVENTS = ["raw_syscalls:sys_enter", "syscalls:sys_enter_writev", "syscalls:sys_enter_write",
          "syscalls:sys_enter_read", "syscalls:sys_enter_recvfrom", "syscalls:sys_enter_sendto",
          "syscalls:sys_enter_sendmsg",
          "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_futex", "syscalls:sys_enter_sched_yield"]


def deliveries(admin: int) -> float:
    _, page = odin.http_get(f"http://127.0.0.1:{admin}/metrics")
    total = 0.0
    for line in page.splitlines():
        if line.startswith("ws_shard_deliveries_total"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def perf_stat(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    return subprocess.Popen(["perf", "stat", "-x", ",", "-o", str(out), "-e", ",".join(EVENTS), "-p", str(pid),
                             "--", "sleep", str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def parse_perf(path: Path) -> dict:
    counts = {}
    for line in path.read_text().splitlines():
        parts = line.split(",")
        if len(parts) < 3 or line.startswith("#"):
            continue
        try:
            counts[parts[2].split(":")[-1].replace("sys_enter_", "") or parts[2]] = int(parts[0])
        except ValueError:
            continue
    return counts


def one_run(side, bins: Path, lt: Path, shape: str, path: str, rate: int, hold: int, shard_flags, lb_flags) -> dict:
    cfg = SHAPES[shape]
    procs = odin.Procs("fanout-syscalls")
    tmp = Path(tempfile.mkdtemp())
    try:
        shard, shard_ports, admin = bench.start_shards(procs, extra=SHARD_BENCH_FLAGS + shard_flags, bin_dir=bins)
        watched = {"shard": shard.pid}
        if path == "ws-lb":
            lb, port, _ = bench.start_lb(procs, shard_ports, extra=lb_flags, bin_dir=bins)
            watched["lb"] = lb.pid
            urls = [f"ws://127.0.0.1:{port}/ws"]
        else:
            urls = [f"ws://127.0.0.1:{p}/ws" for p in shard_ports]
        commands = {name: p.args for name, p in procs.procs.items()}
        report = tmp / "report.json"
        args = [str(lt), "--url", ",".join(urls), "--connections", str(cfg["subscribers"]), "--rate", "2000",
                "--hold", str(hold), "--source-ips", "127.0.0.2-127.0.0.9", "--json", str(report), "--quiet",
                "--channels", "fan.C{0..9}", "--channels-per-conn", str(cfg["per_conn"]),
                "--publish-url", f"http://127.0.0.1:{admin}/publish", "--publish-rate", str(rate),
                "--publish-connections", "8"]
        commands["loadtest"] = args
        gen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        cpu_of = dict(watched, loadtest=gen.pid)
        # The publisher starts with the hold, once every subscriber is in.
        odin.wait_for(lambda: deliveries(admin) > 0 or gen.poll() is not None, cfg["subscribers"] / 2000 + 30,
                      "the first delivery")
        time.sleep(1.0)
        window = max(hold - 4, 2)
        load0 = bench.load()
        cpu0 = {n: bench.proc_cpu_s(p) for n, p in cpu_of.items()}
        d0, t0 = deliveries(admin), time.time()
        stats = {n: perf_stat(p, window, tmp / f"{n}.perf") for n, p in watched.items()}
        for p in stats.values():
            p.wait(timeout=window + 30)
        d1, t1 = deliveries(admin), time.time()
        cpu1 = {n: bench.proc_cpu_s(p) for n, p in cpu_of.items()}
        out, err = gen.communicate(timeout=3600)
        if not report.exists():
            raise SystemExit(f"loadtest produced no report: {out[-2000:]} {err[-2000:]}")
        rep = json.loads(report.read_text())
    finally:
        procs.stop()
    n = max(d1 - d0, 1)
    row = {"side": side, "shape": shape, "path": path, "publish_rate": rate, "subscribers": cfg["subscribers"],
           "channels_per_conn": cfg["per_conn"], "commands": commands, "loadavg_before": load0,
           "loadavg_after": bench.load(), "window_s": t1 - t0, "window_deliveries": d1 - d0,
           "deliveries_per_s": rep["deliveries_per_s"], "delivery_p50_ms": rep["delivery_us"]["p50"] / 1000,
           "delivery_p99_ms": rep["delivery_us"]["p99"] / 1000, "gaps": rep["counts"]["gaps"],
           "duplicates": rep["counts"]["duplicates"], "established": rep["counts"]["established"],
           "publisher": rep.get("publisher"), "processes": {},
           "loadtest_cpu_s": cpu1["loadtest"] - cpu0["loadtest"]}
    for name in watched:
        counts = parse_perf(tmp / f"{name}.perf")
        row["processes"][name] = {
            "syscalls": counts,
            "syscalls_per_delivery": counts.get("raw_syscalls:sys_enter", counts.get("sys_enter", 0)) / n,
            "per_delivery": {k: v / n for k, v in counts.items()},
            "cpu_s": cpu1[name] - cpu0[name],
            "cpu_us_per_delivery": (cpu1[name] - cpu0[name]) * 1e6 / n,
        }
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="directory with build A's ws-shard and ws-lb (the base)")
    ap.add_argument("--b", default=str(odin.release_bin()), help="directory with build B's binaries")
    ap.add_argument("--loadtest", default=str(odin.release_bin() / "loadtest"), help="one loadtest for both sides")
    for side in "ab":
        ap.add_argument(f"--{side}-shard-flags", default="", help=f"extra ws-shard flags for side {side.upper()}")
        ap.add_argument(f"--{side}-lb-flags", default="", help=f"extra ws-lb flags for side {side.upper()}")
        ap.add_argument(f"--{side}-commit", default="", help=f"commit side {side.upper()} was built from "
                        "(default: the git checkout its directory is in)")
    ap.add_argument("--shapes", nargs="+", default=["dense", "wide"])
    ap.add_argument("--paths", nargs="+", default=["ws-lb", "direct"])
    ap.add_argument("--dense-rate", type=int, default=200, help="messages/s published in the dense shape")
    ap.add_argument("--wide-rate", type=int, default=50, help="messages/s published in the wide shape")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the first is reported apart")
    ap.add_argument("--hold", type=int, default=12)
    a = ap.parse_args()
    sides = {"A": (Path(a.a), shlex.split(a.a_shard_flags), shlex.split(a.a_lb_flags)),
             "B": (Path(a.b), shlex.split(a.b_shard_flags), shlex.split(a.b_lb_flags))}
    commits = {"A": a.a_commit, "B": a.b_commit}
    lt = Path(a.loadtest)
    results = {"machine": bench.machine(), "command": " ".join(sys.argv), "events": EVENTS,
               "sides": {s: {"dir": str(d), "commit": commits[s] or bench.commit_of(d if d.exists() else odin.REPO),
                             "shard_flags": SHARD_BENCH_FLAGS + sf, "lb_flags": lf} for s, (d, sf, lf) in sides.items()},
               "loadtest": {"path": str(lt), "commit": a.b_commit if lt.parent == Path(a.b) and a.b_commit
                            else bench.commit_of(lt.parent)},
               "note": "start_shards/start_lb in bench.py add --max-connections 6000 --drain-window 1s --client-rate 0 "
                       "(shard) and --per-ip-rate 0 --admission-rate 20000 --admission-burst 2000 --drain-window 1s "
                       "(lb); the exact command of every process is in each run's `commands`",
               "runs": []}
    rates = {"dense": a.dense_rate, "wide": a.wide_rate}
    for rnd in range(a.rounds):
        order = ["A", "B"] if rnd % 2 == 0 else ["B", "A"]
        for shape in a.shapes:
            for path in a.paths:
                for side in order:
                    d, sf, lf = sides[side]
                    row = one_run(side, d, lt, shape, path, rates[shape], a.hold, sf, lf)
                    row["round"] = rnd
                    results["runs"].append(row)
                    procs = row["processes"]
                    print(f"round {rnd} {side} {shape} {path}: {row['deliveries_per_s']:.0f}/s p50 "
                          f"{row['delivery_p50_ms']:.1f} p99 {row['delivery_p99_ms']:.1f} ms, syscalls/delivery "
                          + ", ".join(f"{n} {p['syscalls_per_delivery']:.3f}" for n, p in procs.items())
                          + ", CPU us/delivery " + ", ".join(f"{n} {p['cpu_us_per_delivery']:.2f}" for n, p in procs.items())
                          + f", loadtest CPU {row['loadtest_cpu_s'] / row['window_s']:.2f} cores"
                          + f", publisher {(row['publisher'] or {}).get('achieved_rate', 0):.0f}/s"
                          + f", gaps/dups {row['gaps']}/{row['duplicates']}, load {row['loadavg_before'][0]}", flush=True)
    print("\n| shape | path | side | rounds | deliveries/s | p50 | p99 | shard syscalls/delivery | shard writes/delivery | "
          "lb syscalls/delivery | shard CPU µs/delivery | lb CPU µs/delivery | gaps/dups |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in a.shapes:
        for path in a.paths:
            for side in ["A", "B"]:
                for label, rows in (("first", [r for r in results["runs"] if r["round"] == 0]),
                                    ("warm", [r for r in results["runs"] if r["round"] > 0])):
                    rows = [r for r in rows if r["shape"] == shape and r["path"] == path and r["side"] == side]
                    if not rows:
                        continue

                    def med(f):
                        vals = [f(r) for r in rows]
                        vals = [v for v in vals if v is not None]
                        return statistics.median(vals) if vals else float("nan")

                    def proc(name, key):
                        return med(lambda r: r["processes"].get(name, {}).get(key))

                    writes = med(lambda r: sum(r["processes"]["shard"]["per_delivery"].get(k, 0)
                                               for k in ("writev", "write", "sendto", "sendmsg")))
                    print(f"| {shape} | {path} | {side} | {label} ({len(rows)}) | {med(lambda r: r['deliveries_per_s']):,.0f} | "
                          f"{med(lambda r: r['delivery_p50_ms']):.1f} ms | {med(lambda r: r['delivery_p99_ms']):.1f} ms | "
                          f"{proc('shard', 'syscalls_per_delivery'):.3f} | {writes:.3f} | {proc('lb', 'syscalls_per_delivery'):.3f} | "
                          f"{proc('shard', 'cpu_us_per_delivery'):.2f} | {proc('lb', 'cpu_us_per_delivery'):.2f} | "
                          f"{sum(r['gaps'] for r in rows)}/{sum(r['duplicates'] for r in rows)} |")
    results["loadavg_at_end"] = bench.load()
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    out = bench.RESULTS / f"fanout-syscalls-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"\nraw results: {out.relative_to(odin.REPO)}")


if __name__ == "__main__":
    main()
