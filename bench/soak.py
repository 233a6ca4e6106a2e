#!/usr/bin/env python3
"""Soak (`make soak`): many connections held for a long time with steady fan-out and
continuous churn; samples ws-lb and ws-shard RSS and connection gauges over time.

Defaults: 100,000 connections through 12 ws-lb processes sharing the port (SO_REUSEPORT)
to 8 ws-shard processes, held 30 minutes, a publisher per shard process at 10 messages/s over
100 channels (80 messages/s in all, ~10,000 deliveries/s),
and 1 % churn (1,000 extra clients connecting, holding 20 s and leaving, over and over).

Warm-up: every history ring is filled first (--prefill-rate), then 5 minutes of the hold.

Pass criteria: RSS drift under 5 % between the first window after warm-up and the last
window, and no leak (shard connection gauges back to exactly the churn-free population at
the end, then to 0 after the clients leave). Results: bench/results/soak-<time>.json.

    soak.py [--connections N] [--minutes M] [--lb-procs L] [--shard-procs S]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


CHANNELS = 100


def prefill(admins, history_len, rate):
    """Publishes history_len messages to each of the 100 channels on every shard process (in
    parallel), so every history ring is full before the measurement starts."""
    duration = history_len * CHANNELS / rate + 0.5
    runs = []
    for admin in admins:
        out = Path(tempfile.mkdtemp()) / "prefill.json"
        runs.append((out, subprocess.Popen(
            [str(bench.LT), "publish", "--publish-url", f"http://127.0.0.1:{admin}/publish", "--rate", str(rate),
             "--channels", f"soak.C{{0..{CHANNELS - 1}}}", "--duration", f"{duration}s", "--json", str(out), "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    accepted = []
    for out, p in runs:
        _, err = p.communicate(timeout=duration + 120)
        if p.returncode != 0 or not out.exists():
            raise RuntimeError(f"prefill publisher failed: {err[-1000:]}")
        accepted.append(json.loads(out.read_text())["accepted"])
    need = history_len * CHANNELS
    if min(accepted) < need:
        raise RuntimeError(f"prefill: a shard process accepted only {min(accepted)} of {need} messages")
    return {"messages_per_process": need, "accepted_min": min(accepted), "seconds": round(duration, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--connections", type=int, default=100_000)
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--rate", type=int, default=2000)
    ap.add_argument("--lb-procs", type=int, default=12)
    ap.add_argument("--shard-procs", type=int, default=8)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--churn", type=float, default=0.01)
    ap.add_argument("--sample-s", type=int, default=30)
    ap.add_argument("--publish-rate", type=int, default=10, help="messages/s per shard process, over 100 channels")
    # At 0.1 message/s per channel the 1,000-entry history rings would take ~3 h to fill, so
    # shard RSS would keep rising (bounded) through a 30-minute run: a cache warming up, not
    # drift. The warm-up therefore fills every ring first (--prefill-rate messages/s per
    # shard process, same message shape as the steady feed) before any client connects.
    ap.add_argument("--history-len", type=int, default=1000, help="ws-shard --history-len")
    ap.add_argument("--prefill-rate", type=int, default=4000, help="warm-up publish rate per shard process (0 = no prefill)")
    a = ap.parse_args()
    procs = bench.odin.Procs("soak")
    result = {"machine": bench.machine(), "command": " ".join(sys.argv), "samples": []}
    try:
        shard_ports, shard_pids, admins = [], [], []
        per_shard = a.connections // (2 * a.shard_procs) + 2000
        for _ in range(a.shard_procs):
            p, ports, admin = bench.start_shards(procs, shards=2, max_conn=per_shard, extra=["--history-len", str(a.history_len)])
            shard_ports += ports
            shard_pids.append(p.pid)
            admins.append(admin)
        port, lb_pids = bench.free_port(), []
        for i in range(a.lb_procs):
            p, _, _ = bench.start_lb(procs, shard_ports, name=f"lb{i}", port=port, extra=["--reuse-port"])
            lb_pids.append(p.pid)
        lbs, shards = bench.Sampler(lb_pids), bench.Sampler(shard_pids)
        if a.prefill_rate > 0:
            result["prefill"] = prefill(admins, a.history_len, a.prefill_rate)
            print(json.dumps({"prefill": result["prefill"]}), flush=True)
        hold_s = int(a.minutes * 60)
        ramp_s = a.connections / a.rate
        out = Path(tempfile.mkdtemp()) / "main.json"
        main_lt = subprocess.Popen(
            [str(bench.LT), "--url", f"ws://127.0.0.1:{port}/ws", "--connections", str(a.connections), "--rate", str(a.rate),
             "--hold", str(hold_s), "--workers", str(a.workers), "--source-ips", "127.0.0.2-127.0.0.41",
             "--channels", "soak.C{0..99}", "--publish-url", f"http://127.0.0.1:{admins[0]}/publish",
             "--publish-rate", str(a.publish_rate), "--json", str(out), "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The embedded bus is per process: one publisher per shard process (the main run's
        # own publisher covers the first), so every client receives messages.
        publishers = [subprocess.Popen(
            [str(bench.LT), "publish", "--publish-url", f"http://127.0.0.1:{admin}/publish", "--rate", str(a.publish_rate),
             "--channels", "soak.C{0..99}", "--duration", str(int(ramp_s) + hold_s), "--quiet"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for admin in admins[1:]]
        stop = threading.Event()
        churn_runs = []

        def churn():
            n = max(int(a.connections * a.churn), 1)
            while not stop.is_set():
                rep = bench.loadtest(f"ws://127.0.0.1:{port}/ws", n, max(n // 10, 1), 20, ["--source-ips", "127.0.0.42-127.0.0.45"],
                                     name="churn")
                churn_runs.append({k: rep["counts"][k] for k in ("attempted", "established", "active_end_of_hold")})

        time.sleep(ramp_s + 5)
        churner = threading.Thread(target=churn, daemon=True)
        churner.start()
        t0 = time.time()
        while time.time() - t0 < hold_s - 30:
            conns = 0
            for p in shard_ports:
                conns += bench.odin.get_json(f"http://127.0.0.1:{p}/health", timeout=3)["connections"]
            s = {"t_s": round(time.time() - t0), "lb_rss_mib": lbs.rss() / 1024, "shard_rss_mib": shards.rss() / 1024,
                 "shard_connections": conns}
            result["samples"].append(s)
            print(json.dumps(s), flush=True)
            time.sleep(a.sample_s)
        stop.set()
        churner.join(timeout=120)
        stdout, _ = main_lt.communicate(timeout=hold_s + 600)
        for p in publishers:
            p.kill()
        rep = json.loads(out.read_text())
        result["main"] = bench.summarize(rep) | {"deliveries_per_s": rep["deliveries_per_s"], "gaps": rep["counts"]["gaps"]}
        result["churn_runs"] = len(churn_runs)
        result["churn_failed"] = sum(r["attempted"] - r["established"] for r in churn_runs)
        # Warm-up: skip the first 5 minutes (or the first fifth of a short run).
        warm = min(300, hold_s // 5)
        window = max(1, len(result["samples"]) // 6)
        settled = [s for s in result["samples"] if s["t_s"] >= warm]
        first, last = settled[:window], settled[-window:]
        drift = {}
        for k in ("lb_rss_mib", "shard_rss_mib"):
            f, l = statistics.mean(x[k] for x in first), statistics.mean(x[k] for x in last)
            drift[k] = 100 * (l - f) / f
        result["drift_pct"] = drift
        time.sleep(15)
        left = sum(bench.odin.get_json(f"http://127.0.0.1:{p}/health", timeout=3)["connections"]
                   for p in shard_ports)
        result["shard_connections_after_clients_left"] = left
        ok = all(abs(v) < 5 for v in drift.values()) and left == 0
        result["pass"] = ok
        print(f"\nRSS drift after warm-up: LB {drift['lb_rss_mib']:+.2f} %, shards {drift['shard_rss_mib']:+.2f} %; "
              f"connections left after the clients went away: {left}; churn runs {len(churn_runs)} "
              f"({result['churn_failed']} failed attempts); main: {result['main']}")
        print("PASS" if ok else "FAIL")
    finally:
        procs.stop()
        bench.save("soak", result)


if __name__ == "__main__":
    main()
