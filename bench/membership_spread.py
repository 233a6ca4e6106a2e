#!/usr/bin/env python3
"""How evenly ws-lb spreads new connections over its shards, second by second, under a
1,000/s ramp: build A against build B, alternating, same shards, same load tool.

ws-lb picks a shard by power of two choices on a score refreshed by a health poll once per
`health_interval` (1 s). Before live relay counts, the better of two stale scores won every
comparison until the next poll, so within each second most new clients went to whichever
shards looked emptiest at the last poll. With this LB's own relays counted between polls,
each placement is visible to the next one.

Each run: one ws-shard process with 4 shards (fresh), one ws-lb in front (static
--backend-urls, defaults otherwise but no per-IP limit and a pacing rate above the ramp),
loadtest opens 5,000 connections at 1,000/s (no subscription) and holds them 2 s; ws-lb's
ws_handshake_success_total{shard_id} is read every second. Reported per run: for each full
second of the ramp, the shards' shares of that second's new connections; the spread of a
second is max share - min share (0 = perfectly even; an even share is 0.25); the run's
figure is the median spread over its seconds, and the worst.

Usage: membership_spread.py --a DIR --b DIR [--runs N]   (DIR holds ws-lb, ws-shard; the
load tool is --loadtest, default target/debug/loadtest). First pair reported apart.
"""

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import odin  # noqa: E402

CONNECTIONS = 5000
RATE = 1000
SHARDS = 4


def successes(admin):
    text = odin.http_get(f"http://127.0.0.1:{admin}/metrics")[1]
    out = {}
    for line in text.splitlines():
        if line.startswith("ws_handshake_success_total{"):
            sid = int(line.split('shard_id="', 1)[1].split('"', 1)[0])
            out[sid] = float(line.rsplit(" ", 1)[1])
    return out


def one_run(bin_dir: Path, loadtest: Path):
    with odin.Procs("membership-spread", grace=10) as procs:
        _, ports, _ = bench.start_shards(procs, shards=SHARDS, bin_dir=bin_dir)
        _, port, admin = bench.start_lb(procs, ports, bin_dir=bin_dir)
        samples = []
        stop = threading.Event()

        def sample():
            t0 = time.monotonic()
            k = 0
            while not stop.is_set():
                samples.append(successes(admin))
                k += 1
                delay = t0 + k - time.monotonic()
                if delay > 0:
                    stop.wait(delay)

        th = threading.Thread(target=sample)
        th.start()
        bench.LT = loadtest
        rep = bench.loadtest(f"ws://127.0.0.1:{port}/ws", CONNECTIONS, RATE, 2)
        stop.set()
        th.join()
    seconds = []
    for a, b in zip(samples, samples[1:]):
        d = [b.get(i, 0) - a.get(i, 0) for i in range(SHARDS)]
        total = sum(d)
        if total >= RATE * 0.5:
            seconds.append([round(x / total, 3) for x in d])
    # Range of the shares in a second: 0 = even; 0.5 = one shard got half, another none.
    spreads = [max(s) - min(s) for s in seconds]
    return {"summary": bench.summarize(rep), "per_second_shares": seconds,
            "spread_median": round(statistics.median(spreads), 3) if spreads else None,
            "spread_worst": round(max(spreads), 3) if spreads else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, type=Path)
    ap.add_argument("--b", required=True, type=Path)
    ap.add_argument("--a-label", default="", help="what build A is (e.g. its commit) when DIR is no checkout")
    ap.add_argument("--b-label", default="")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--loadtest", type=Path, default=bench.REPO / "target" / "debug" / "loadtest")
    a = ap.parse_args()
    data = {"machine": bench.machine(), "connections": CONNECTIONS, "rate": RATE, "shards": SHARDS,
            "builds": {"a": {"dir": str(a.a), "commit": a.a_label or bench.commit_of(a.a)},
                       "b": {"dir": str(a.b), "commit": a.b_label or bench.commit_of(a.b)}},
            "non_default_flags": {"ws-lb": ["--per-ip-rate 0", "--admission-rate 20000", "--admission-burst 2000",
                                            "--drain-window 1s", "--log-level warn"],
                                  "ws-shard": ["--shards 4", "--client-rate 0", "--drain-window 1s", "--log-level warn"]},
            "runs": []}
    for i in range(a.runs):
        for name, d in (("a", a.a), ("b", a.b)):
            r = one_run(d, a.loadtest)
            r.update(build=name, pair=i, loadavg=bench.load())
            data["runs"].append(r)
            print(f"pair {i} build {name}: spread median {r['spread_median']} worst {r['spread_worst']} "
                  f"success {r['summary']['success_pct']:.1f} % achieved {r['summary']['achieved_rate']:.0f}/s "
                  f"shares {r['per_second_shares']}")
    for name in ("a", "b"):
        warm = [r["spread_median"] for r in data["runs"] if r["build"] == name and r["pair"] > 0]
        data[f"{name}_warm_median_spread"] = statistics.median(warm) if warm else None
    print(f"\nwarm runs, median per-second spread (max share - min share; even = 0): "
          f"A {data['a_warm_median_spread']}, B {data['b_warm_median_spread']}")
    bench.save("membership-spread", data)


if __name__ == "__main__":
    main()
